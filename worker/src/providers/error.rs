//! Why a provider client cannot be built or cannot prove who it is. At start-up these stop the
//! worker with one line naming the app and the file; later (a provider token that cannot be
//! signed, an OAuth endpoint that is down) they become the transport error of the attempt.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use pushfleet_core::config::Platform;

#[derive(Debug, Clone, thiserror::Error)]
pub enum ProviderError {
    #[error("cannot read {}: {source}", path.display())]
    Unreadable {
        path: PathBuf,
        source: Arc<std::io::Error>,
    },
    /// A credential or CA file that is not what it should be.
    #[error("{}: {problem}", path.display())]
    BadFile { path: PathBuf, problem: String },
    #[error("{url}: not a URL: {problem}")]
    BadEndpoint { url: String, problem: String },
    #[error("cannot build the {provider} HTTP client: {detail}")]
    HttpClient {
        provider: &'static str,
        detail: String,
    },
    #[error("cannot sign the {what}: {source}")]
    Signing {
        what: &'static str,
        source: jsonwebtoken::errors::Error,
    },
    #[error("[worker] https_proxy {url}: {problem}")]
    BadProxy { url: String, problem: String },
    #[error("no [apps.{0}] section")]
    MissingSection(&'static str),
    /// The OAuth token endpoint did not hand out an access token.
    #[error("{0}")]
    TokenEndpoint(String),
    /// Any of the above, for the app it concerns.
    #[error("app {app} ({platform}): {source}")]
    App {
        app: String,
        platform: Platform,
        source: Box<ProviderError>,
    },
}

impl ProviderError {
    pub fn bad_file(path: &Path, problem: impl Into<String>) -> ProviderError {
        ProviderError::BadFile {
            path: path.to_path_buf(),
            problem: problem.into(),
        }
    }
}

/// Reads a credential or CA file.
pub fn read_file(path: &Path) -> Result<Vec<u8>, ProviderError> {
    std::fs::read(path).map_err(|source| ProviderError::Unreadable {
        path: path.to_path_buf(),
        source: Arc::new(source),
    })
}
