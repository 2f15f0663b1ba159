//! What every handler shares: the settings and what was derived from them at start-up, the link
//! to RabbitMQ, the database pool and the metrics handle.

use std::sync::Arc;

use deadpool_postgres::{Object, Pool};
use metrics_exporter_prometheus::PrometheusHandle;
use pushfleet_core::db::DbError;
use pushfleet_core::service::metrics_recorder;
use pushfleet_core::{EventPolicies, Settings};

use crate::auth::ApiKeys;
use crate::broker::Broker;
use crate::error::ApiError;
use crate::fcm_projects::FcmProjects;

pub struct AppState {
    pub settings: Settings,
    pub policies: EventPolicies,
    pub broker: Broker,
    /// Device tokens (v2) and audit queries.
    pub db: Pool,
    pub fcm_projects: FcmProjects,
    pub metrics: PrometheusHandle,
    /// The API keys in force (reloaded by `auth::keep_fresh`) and their rate limits.
    pub api_keys: Arc<ApiKeys>,
}

pub type Shared = Arc<AppState>;

impl AppState {
    pub fn new(settings: Settings, broker: Broker, db: Pool) -> AppState {
        AppState {
            policies: settings.event_policies(),
            fcm_projects: FcmProjects::load(&settings),
            api_keys: Arc::new(ApiKeys::new(settings.ingest.rate_limit_share)),
            settings,
            broker,
            db,
            metrics: metrics_recorder(),
        }
    }

    /// The most a request body may hold.
    pub fn body_limit(&self) -> usize {
        self.settings.ingest.max_body_bytes
    }

    /// A database connection; none to be had is the caller's 503.
    pub async fn db_client(&self) -> Result<Object, ApiError> {
        Ok(self.db.get().await.map_err(DbError::from)?)
    }
}
