//! The Firebase project ids of the configured apps. Android clients name their app in an RFC 8599
//! `pn-param` by its project id, which the settings may not spell out: it is read from the
//! service-account files once, at start-up, rather than on every push.

use std::collections::HashMap;

use pushfleet_core::config::{Platform, Settings};
use serde_json::Value;

/// Project id → app id, for the configured Firebase apps.
#[derive(Debug, Default, Clone)]
pub struct FcmProjects(HashMap<String, String>);

impl FcmProjects {
    pub fn load(settings: &Settings) -> FcmProjects {
        let mut projects = HashMap::new();
        for app in settings
            .apps
            .iter()
            .filter(|a| a.platform == Platform::Firebase)
        {
            let Some(fcm) = &app.fcm else { continue };
            let project = fcm.project_id.clone().or_else(|| {
                let text = std::fs::read_to_string(&fcm.service_account_file).ok()?;
                let json: Value = serde_json::from_str(&text).ok()?;
                json["project_id"].as_str().map(str::to_string)
            });
            if let Some(project) = project {
                projects.entry(project).or_insert_with(|| app.id.clone());
            }
        }
        FcmProjects(projects)
    }

    /// The id of the app whose Firebase project is `project`.
    pub fn app_id(&self, project: &str) -> Option<&str> {
        self.0.get(project).map(String::as_str)
    }
}
