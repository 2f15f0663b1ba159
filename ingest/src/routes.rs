//! The API's routes, and the layers every request passes: the request counter, the HTTP limits
//! (load shedding, slow bodies), the access list, then the API key. The probes and metrics
//! are on the API listener, or on the admin listener when one is configured.

use std::sync::Arc;

use axum::middleware;
use axum::response::Redirect;
use axum::routing::{any, get, post};
use axum::Router;
use tokio::sync::Semaphore;

use crate::acl::{self, AccessList};
use crate::ops::{self, method_not_allowed};
use crate::state::Shared;
use crate::{audit, auth, rfc8599, unifiedpush, v1, v2, wakeup};

pub fn router(state: Shared, acl: AccessList) -> Router {
    let in_flight = Arc::new(Semaphore::new(
        state.live().settings.http.max_in_flight_requests,
    ));
    let api = Router::new()
        .route("/", get(ops::home))
        .route("/push", post(v1::push).fallback(method_not_allowed))
        // Starlette's redirect_slashes, which Sylk clients may rely on.
        .route("/push/", any(|| async { Redirect::temporary("/push") }))
        .route(
            "/v2/tokens/{account}",
            post(v2::add_token)
                .delete(v2::remove_token)
                .get(v2::list_tokens)
                .fallback(method_not_allowed),
        )
        .route(
            "/v2/tokens/{account}/push",
            post(v2::push_account).fallback(method_not_allowed),
        )
        .route(
            "/v2/tokens/{account}/push/{device}",
            post(v2::push_device).fallback(method_not_allowed),
        )
        .route(
            "/v2/tokens/{account}/wakeup",
            post(wakeup::wake_account).fallback(method_not_allowed),
        )
        .route(
            "/v2/tokens/{account}/wakeup/{device}",
            post(wakeup::wake_device).fallback(method_not_allowed),
        )
        .route(
            "/rfc8599/push",
            post(rfc8599::push).fallback(method_not_allowed),
        )
        .route(
            "/rfc8599/wakeup",
            post(wakeup::wake_by_parameters).fallback(method_not_allowed),
        )
        .route("/audit", get(audit::audit).fallback(method_not_allowed))
        .route(
            "/audit/summary",
            get(audit::summary).fallback(method_not_allowed),
        );
    // With an admin listener, the probes and metrics are served there only.
    let api = if state.live().settings.ingest.admin_listen.is_some() {
        api
    } else {
        with_probes(api)
    };
    // UnifiedPush endpoints are called by any application server an app gave its endpoint to:
    // the endpoint token in the URL is their credential, so neither the access list nor API
    // keys apply (see `unifiedpush`).
    let unifiedpush = Router::new().route(
        "/UP",
        post(unifiedpush::push)
            .get(unifiedpush::discover)
            .fallback(method_not_allowed),
    );
    api.fallback(ops::no_route)
        .layer(middleware::from_fn_with_state(
            state.clone(),
            auth::authenticate,
        ))
        .layer(middleware::from_fn_with_state(Arc::new(acl), acl::guard))
        .merge(unifiedpush)
        .layer(middleware::from_fn_with_state(
            in_flight,
            ops::limit_requests,
        ))
        .layer(middleware::from_fn(ops::count_requests))
        .with_state(state)
}

/// The admin listener's routes (`[ingest] admin_listen`): the probes and metrics only, behind
/// their own access list (`admin_allowed_hosts`).
pub fn admin_router(state: Shared, acl: AccessList) -> Router {
    with_probes(Router::new())
        .fallback(ops::no_route)
        .layer(middleware::from_fn_with_state(Arc::new(acl), acl::guard))
        .layer(middleware::from_fn(ops::count_requests))
        .with_state(state)
}

fn with_probes(router: Router<Shared>) -> Router<Shared> {
    router
        .route("/health", get(ops::health))
        .route("/ready", get(ops::ready))
        .route("/metrics", get(ops::metrics_text))
}
