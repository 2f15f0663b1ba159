//! The resolver of the WebPush client: it hands the connector only addresses the endpoint rules
//! allow, so the address checked is the address connected to, whatever DNS says next time.

use std::sync::Arc;

use pushfleet_core::config::WebPushSettings;
use pushfleet_core::webpush;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};

pub struct CheckedResolver {
    settings: Arc<WebPushSettings>,
}

impl CheckedResolver {
    pub fn new(settings: Arc<WebPushSettings>) -> CheckedResolver {
        CheckedResolver { settings }
    }
}

impl Resolve for CheckedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let settings = self.settings.clone();
        Box::pin(async move {
            // The connector sets the URL's port on each address.
            let addresses = webpush::resolve_host(&settings, name.as_str(), 0).await?;
            let addresses: Addrs = Box::new(addresses.into_iter());
            Ok(addresses)
        })
    }
}
