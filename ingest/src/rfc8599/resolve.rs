//! From push parameters to a configured app and a token, as Flexisip reads them: Linphone's
//! `remote&voip` pair with `tok:remote&tok:voip`, `apns.dev`, the legacy `pn-type`/`app-id`/
//! `pn-tok`, and `android`/`firebase` meaning `fcm`.

use pushfleet_core::config::{AppSettings, AppType, Platform, Settings};

use super::params::{required, Params};
use crate::error::ApiError;
use crate::fcm_projects::FcmProjects;

/// Where a push goes once the parameters are understood.
#[derive(Debug, Clone, PartialEq)]
pub struct Target {
    pub platform: Platform,
    pub app_id: String,
    pub token: String,
    /// The parameter the token came from (`pn-prid`, or the legacy `pn-tok`), for messages.
    pub token_param: &'static str,
    /// APNs: the device's VoIP (PushKit) token and its remote (alert/background) token.
    pub voip_token: Option<String>,
    pub remote_token: Option<String>,
}

impl Target {
    /// An iOS device without a VoIP token: calls ring it by alerts.
    pub fn remote_only(&self) -> bool {
        self.platform == Platform::Apple && self.voip_token.is_none()
    }

    /// The token a cancel of a call goes to.
    pub fn cancel_token(&self) -> &str {
        self.remote_token.as_deref().unwrap_or(&self.token)
    }
}

/// Resolves the parameters to a configured app and a token for `event`. `app_hint` is the
/// request's own `app-id`, which wins when it names a configured app of the platform.
pub fn resolve(
    params: &Params,
    event: &str,
    app_hint: Option<&str>,
    settings: &Settings,
    fcm_projects: &FcmProjects,
) -> Result<Target, ApiError> {
    let provider = Provider::of(params)?;
    match provider.platform {
        Platform::Apple => resolve_apple(params, &provider, event, app_hint, settings),
        Platform::Firebase => {
            resolve_firebase(params, provider.legacy, app_hint, settings, fcm_projects)
        }
        // RFC 8599's `webpush` provider carries the subscription in `pn-prid`; not taken yet.
        Platform::UnifiedPush => Err(ApiError::UnsupportedProvider(provider.name)),
    }
}

/// The push service the parameters name.
struct Provider {
    /// Lower case, as given.
    name: String,
    platform: Platform,
    /// Linphone's older parameters: `pn-type`, `app-id` and `pn-tok`.
    legacy: bool,
}

impl Provider {
    fn of(params: &Params) -> Result<Provider, ApiError> {
        let legacy = !params.contains_key("pn-provider") && params.contains_key("pn-type");
        let key = if legacy { "pn-type" } else { "pn-provider" };
        let name = required(params, key)?.to_ascii_lowercase();
        let platform = match name.as_str() {
            "apns" | "apns.dev" | "apns-sandbox" | "apns.sandbox" | "apple" | "ios" => {
                Platform::Apple
            }
            "fcm" | "firebase" | "android" | "google" => Platform::Firebase,
            _ => return Err(ApiError::UnsupportedProvider(name)),
        };
        Ok(Provider {
            name,
            platform,
            legacy,
        })
    }
}

/// An APNs service of a Linphone/Flexisip `pn-param`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Service {
    Remote,
    Voip,
}

impl Service {
    fn parse(name: &str) -> Option<Service> {
        match name {
            "remote" => Some(Service::Remote),
            "voip" => Some(Service::Voip),
            _ => None,
        }
    }
}

/// An Apple device as the parameters address it.
struct AppleAddress<'p> {
    bundle: String,
    services: Vec<Service>,
    /// The token, or one per service.
    prid: &'p str,
    sandbox: bool,
}

fn resolve_apple(
    params: &Params,
    provider: &Provider,
    event: &str,
    app_hint: Option<&str>,
    settings: &Settings,
) -> Result<Target, ApiError> {
    let address = if provider.legacy {
        legacy_apple_address(params, app_hint)?
    } else {
        apple_address(params, &provider.name)?
    };
    let tokens = apns_tokens(address.prid, &address.services)?;
    let app = app_hint
        .and_then(|id| settings.app(id, Platform::Apple))
        .or_else(|| apple_app(settings, &address.bundle, address.sandbox))
        .ok_or(ApiError::UnknownApp {
            platform: Platform::Apple,
            app_id: address.bundle,
        })?;
    let of = |wanted: Service| {
        tokens
            .iter()
            .find(|(s, _)| *s == wanted)
            .map(|(_, t)| t.clone())
    };
    Ok(Target {
        platform: Platform::Apple,
        app_id: app.id.clone(),
        token: apple_token(&tokens, app, event),
        token_param: token_param(provider.legacy),
        voip_token: of(Service::Voip),
        remote_token: of(Service::Remote),
    })
}

/// `pn-param` = `<TeamID>.<BundleID>[.<services>]`, `pn-prid` the token(s); any provider but
/// plain `apns` means the sandbox.
fn apple_address<'p>(params: &'p Params, provider: &str) -> Result<AppleAddress<'p>, ApiError> {
    let param = required(params, "pn-param")?;
    // The Team ID only separates.
    let (_team, rest) = param
        .split_once('.')
        .ok_or_else(|| ApiError::MalformedPnParam(param.to_string()))?;
    let (bundle, services) = rest
        .rsplit_once('.')
        .and_then(|(bundle, last)| {
            let services: Option<Vec<Service>> = last.split('&').map(Service::parse).collect();
            Some((bundle, services?))
        })
        .unwrap_or((rest, vec![Service::Remote]));
    Ok(AppleAddress {
        bundle: bundle.to_string(),
        services,
        prid: required(params, "pn-prid")?,
        sandbox: provider != "apns",
    })
}

/// Legacy Linphone: `app-id` = `<bundle>[.voip].prod|.dev`, `pn-tok` = the token.
fn legacy_apple_address<'p>(
    params: &'p Params,
    app_hint: Option<&str>,
) -> Result<AppleAddress<'p>, ApiError> {
    let app_id = app_hint
        .filter(|a| !a.is_empty())
        .ok_or(ApiError::MissingField("app-id"))?;
    let bundle = app_id
        .strip_suffix(".prod")
        .or_else(|| app_id.strip_suffix(".dev"))
        .unwrap_or(app_id);
    let (bundle, service) = match bundle.strip_suffix(".voip") {
        Some(b) => (b, Service::Voip),
        None => (bundle, Service::Remote),
    };
    Ok(AppleAddress {
        bundle: bundle.to_string(),
        services: vec![service],
        prid: required(params, "pn-tok")?,
        sandbox: app_id.ends_with(".dev"),
    })
}

/// APNs tokens by service: `tok` for one service, `tok1:remote&tok2:voip` for two.
fn apns_tokens(prid: &str, services: &[Service]) -> Result<Vec<(Service, String)>, ApiError> {
    let malformed = || ApiError::MalformedPnPrid(prid.to_string());
    if let [service] = services {
        // A single token may still carry its service suffix.
        let token = match prid.rsplit_once(':') {
            Some((token, tag)) if Service::parse(tag).is_some() => token,
            _ => prid,
        };
        return Ok(vec![(*service, token.to_string())]);
    }
    let tokens = prid
        .split('&')
        .map(|part| {
            let (token, tag) = part.rsplit_once(':').ok_or_else(malformed)?;
            let service = Service::parse(tag).ok_or_else(malformed)?;
            Ok((service, token.to_string()))
        })
        .collect::<Result<Vec<_>, ApiError>>()?;
    let complete = tokens.len() == services.len()
        && services
            .iter()
            .all(|s| tokens.iter().any(|(t, tok)| t == s && !tok.is_empty()));
    if complete {
        Ok(tokens)
    } else {
        Err(malformed())
    }
}

/// The configured Apple app for a bundle id, also under its `.dev`/`.prod` configured name.
fn apple_app<'a>(settings: &'a Settings, bundle: &str, sandbox: bool) -> Option<&'a AppSettings> {
    let suffixes: &[&str] = if sandbox {
        &["", ".dev", ".prod"]
    } else {
        &["", ".prod", ".dev"]
    };
    suffixes
        .iter()
        .find_map(|s| settings.app(&format!("{bundle}{s}"), Platform::Apple))
}

/// Calls wake the VoIP service (Linphone apps only ever ring); the rest goes to the remote
/// (background/alert) token. Either falls back to the other.
fn apple_token(tokens: &[(Service, String)], app: &AppSettings, event: &str) -> String {
    let calls = app.app_type == AppType::Linphone
        || matches!(event, "incoming_session" | "incoming_conference_request");
    let preferred = if calls {
        Service::Voip
    } else {
        Service::Remote
    };
    tokens
        .iter()
        .find(|(s, _)| *s == preferred)
        .or(tokens.first())
        .map(|(_, t)| t.clone())
        .unwrap_or_default()
}

fn resolve_firebase(
    params: &Params,
    legacy: bool,
    app_hint: Option<&str>,
    settings: &Settings,
    fcm_projects: &FcmProjects,
) -> Result<Target, ApiError> {
    let (param, token) = if legacy {
        (app_hint.unwrap_or_default(), required(params, "pn-tok")?)
    } else {
        (required(params, "pn-param")?, required(params, "pn-prid")?)
    };
    let app = firebase_app(settings, fcm_projects, app_hint, param).ok_or_else(|| {
        ApiError::NoFirebaseApp {
            pn_param: param.to_string(),
        }
    })?;
    Ok(Target {
        platform: Platform::Firebase,
        app_id: app.id.clone(),
        token: token.to_string(),
        token_param: token_param(legacy),
        voip_token: None,
        remote_token: None,
    })
}

fn token_param(legacy: bool) -> &'static str {
    if legacy {
        "pn-tok"
    } else {
        "pn-prid"
    }
}

/// The Firebase app a push names: by the request's own `app-id`, by `pn-param` as an app id or
/// as a Firebase project id, or the only Firebase app there is.
fn firebase_app<'a>(
    settings: &'a Settings,
    fcm_projects: &FcmProjects,
    app_hint: Option<&str>,
    param: &str,
) -> Option<&'a AppSettings> {
    let app = |id: &str| settings.app(id, Platform::Firebase);
    app_hint
        .and_then(app)
        .or_else(|| app(param))
        .or_else(|| fcm_projects.app_id(param).and_then(app))
        .or_else(|| {
            let mut firebase = settings
                .apps
                .iter()
                .filter(|a| a.platform == Platform::Firebase);
            match (firebase.next(), firebase.next()) {
                (Some(only), None) => Some(only),
                _ => None,
            }
        })
}
