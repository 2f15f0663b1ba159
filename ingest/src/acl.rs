//! The access list (`[ingest] allowed_hosts`): which TCP peers may call the API. Unlike the
//! reference, it guards every route, is checked before the request is read, and an entry that is
//! not an address or network stops the start-up instead of opening the server to everyone.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use axum::extract::{ConnectInfo, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tracing::debug;

use crate::error::ApiError;

/// One allowed network: an address and how many leading bits must match.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Network {
    address: IpAddr,
    prefix: u8,
}

impl Network {
    fn parse(entry: &str) -> Option<Network> {
        let (address, prefix) = match entry.trim().split_once('/') {
            Some((address, prefix)) => (address, Some(prefix.parse::<u8>().ok()?)),
            None => (entry.trim(), None),
        };
        let address: IpAddr = address.parse().ok()?;
        let width = if address.is_ipv4() { 32 } else { 128 };
        let prefix = prefix.unwrap_or(width);
        (prefix <= width).then_some(Network { address, prefix })
    }

    fn contains(&self, peer: IpAddr) -> bool {
        // An IPv4 peer on a dual-stack socket shows up as ::ffff:a.b.c.d.
        match (self.address, peer.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

/// An access-list entry that is neither an address nor a network.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("[ingest] {key}: {entry:?} is not an IP address or network")]
pub struct InvalidEntry {
    /// `allowed_hosts` or `admin_allowed_hosts`.
    pub key: &'static str,
    pub entry: String,
}

/// The parsed access list; empty allows everyone.
#[derive(Debug, Clone, Default)]
pub struct AccessList(Vec<Network>);

impl AccessList {
    /// Parses the entries of the key `key` (named in the error).
    pub fn parse(key: &'static str, entries: &[String]) -> Result<AccessList, InvalidEntry> {
        entries
            .iter()
            .map(|entry| {
                Network::parse(entry).ok_or_else(|| InvalidEntry {
                    key,
                    entry: entry.clone(),
                })
            })
            .collect::<Result<_, _>>()
            .map(AccessList)
    }

    pub fn allows(&self, peer: IpAddr) -> bool {
        self.0.is_empty() || self.0.iter().any(|n| n.contains(peer))
    }
}

/// Middleware: a denied peer gets the reference's 403 on every route.
pub async fn guard(
    State(acl): State<Arc<AccessList>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    request: Request,
    next: Next,
) -> Response {
    if acl.allows(peer.ip()) {
        return next.run(request).await;
    }
    debug!(peer = %peer.ip(), path = %request.uri().path(), "request denied by the access list");
    ApiError::AccessDenied.into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acl(entries: &[&str]) -> Result<AccessList, InvalidEntry> {
        AccessList::parse(
            "allowed_hosts",
            &entries.iter().map(|e| e.to_string()).collect::<Vec<_>>(),
        )
    }

    #[test]
    fn addresses_and_networks() {
        let list = acl(&["10.0.0.0/8", "192.0.2.7", "2001:db8::/32", "0.0.0.0/0"]).unwrap();
        assert!(list.allows("10.200.1.1".parse().unwrap()));
        let strict = acl(&["10.0.0.0/8", "192.0.2.7", "2001:db8::/32"]).unwrap();
        assert!(strict.allows("::ffff:192.0.2.7".parse().unwrap()));
        assert!(strict.allows("2001:db8:1::5".parse().unwrap()));
        assert!(!strict.allows("192.0.2.8".parse().unwrap()));
        assert!(!strict.allows("11.0.0.1".parse().unwrap()));
        assert!(acl(&[]).unwrap().allows("203.0.113.1".parse().unwrap()));
    }

    #[test]
    fn bad_entries_are_named() {
        let error = acl(&["10.0.0.1,10.0.0.2"]).unwrap_err();
        assert_eq!(
            error,
            InvalidEntry {
                key: "allowed_hosts",
                entry: "10.0.0.1,10.0.0.2".into()
            }
        );
        assert_eq!(
            error.to_string(),
            "[ingest] allowed_hosts: \"10.0.0.1,10.0.0.2\" is not an IP address or network"
        );
        assert!(acl(&["10.0.0.0/33"]).is_err());
        assert!(acl(&["[]"]).is_err());
    }
}
