//! What every handler shares: the settings and what was derived from them at start-up, the link
//! to RabbitMQ, the database pool and the metrics handle.

use std::sync::{Arc, PoisonError, RwLock};

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
    /// What a reload replaces; a request keeps the version it started with.
    live: RwLock<Arc<Live>>,
    pub broker: Broker,
    /// Device tokens (v2) and audit queries.
    pub db: Pool,
    pub metrics: PrometheusHandle,
    /// The API keys in force (reloaded by `auth::keep_fresh`) and their rate limits.
    pub api_keys: Arc<ApiKeys>,
}

pub type Shared = Arc<AppState>;

/// The settings in force, and what is derived from them.
pub struct Live {
    pub settings: Settings,
    pub policies: EventPolicies,
    pub fcm_projects: FcmProjects,
}

impl Live {
    fn new(settings: Settings) -> Live {
        Live {
            policies: settings.event_policies(),
            fcm_projects: FcmProjects::load(&settings),
            settings,
        }
    }
}

impl AppState {
    pub fn new(settings: Settings, broker: Broker, db: Pool) -> AppState {
        AppState {
            api_keys: Arc::new(ApiKeys::new(settings.ingest.rate_limit_share)),
            live: RwLock::new(Arc::new(Live::new(settings))),
            broker,
            db,
            metrics: metrics_recorder(),
        }
    }

    /// The settings in force.
    pub fn live(&self) -> Arc<Live> {
        self.live
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Puts in force what `new` may change while running (its apps, the response mode and
    /// limits); requests in progress finish with the settings they started with.
    pub fn reload(&self, new: &Settings) {
        let next = Live::new(self.live().settings.reloaded_from(new));
        *self.live.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(next);
    }

    /// The most a request body may hold.
    pub fn body_limit(&self) -> usize {
        self.live().settings.ingest.max_body_bytes
    }

    /// A database connection; none to be had is the caller's 503.
    pub async fn db_client(&self) -> Result<Object, ApiError> {
        Ok(self.db.get().await.map_err(DbError::from)?)
    }
}
