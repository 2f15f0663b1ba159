//! An XEP-0114 component connection: the stream to the XMPP server's component port, the
//! handshake with the shared secret, then stanzas both ways. The reading half runs in a task
//! of its own (XML parsing is not cancel-safe), handing complete stanzas over a channel.

use std::time::Duration;

use pushfleet_core::config::XmppSettings;
use ring::digest::{digest, SHA1_FOR_LEGACY_USE_ONLY};
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use super::xml::{escape, Element, StreamEvent, StreamReader, XmlError};

/// How long connecting and the handshake may take before the attempt is given up.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one write may take: a server that reads nothing for that long is gone.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

pub const STREAMS_NS: &str = "http://etherx.jabber.org/streams";
pub const COMPONENT_NS: &str = "jabber:component:accept";

#[derive(Debug, thiserror::Error)]
pub enum ComponentError {
    #[error("cannot connect to the XMPP server at {server}: {source}")]
    Connect {
        server: String,
        source: std::io::Error,
    },
    #[error("the XMPP server at {0} did not complete the component handshake in time")]
    Timeout(String),
    /// The server refused the stream: `conflict` while another connection holds the
    /// component, `not-authorized` for a wrong secret.
    #[error("the XMPP server refused the component: {0}")]
    Refused(String),
    #[error("XMPP stream: {0}")]
    Xml(#[from] XmlError),
    #[error("XMPP stream: {0}")]
    Io(#[from] std::io::Error),
    #[error("the XMPP server closed the stream")]
    Closed,
    #[error("the XMPP server did not take a stanza within {} s", WRITE_TIMEOUT.as_secs())]
    WriteTimeout,
}

/// The handshake value of XEP-0114: lowercase hex SHA-1 of the stream id and the secret.
pub fn handshake_digest(stream_id: &str, secret: &str) -> String {
    let hash = digest(
        &SHA1_FOR_LEGACY_USE_ONLY,
        format!("{stream_id}{secret}").as_bytes(),
    );
    hash.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// A component connection that completed its handshake.
pub struct Component {
    writer: OwnedWriteHalf,
    /// Stanzas from the server; an error or the end of the stream ends it.
    pub incoming: mpsc::Receiver<Result<Element, ComponentError>>,
}

impl Component {
    pub async fn connect(
        settings: &XmppSettings,
        secret: &str,
    ) -> Result<Component, ComponentError> {
        tokio::time::timeout(CONNECT_TIMEOUT, Component::open(settings, secret))
            .await
            .map_err(|_| ComponentError::Timeout(settings.server.clone()))?
    }

    async fn open(settings: &XmppSettings, secret: &str) -> Result<Component, ComponentError> {
        let stream = TcpStream::connect(&settings.server)
            .await
            .map_err(|source| ComponentError::Connect {
                server: settings.server.clone(),
                source,
            })?;
        stream.set_nodelay(true)?;
        let (read, mut writer) = stream.into_split();
        let mut reader = StreamReader::new(BufReader::new(read));
        let header = format!(
            "<?xml version='1.0'?><stream:stream xmlns='{COMPONENT_NS}' xmlns:stream='{STREAMS_NS}' to='{}'>",
            escape(&settings.component)
        );
        writer.write_all(header.as_bytes()).await?;
        let id = match reader.next().await? {
            StreamEvent::Open(header) => header.attr("id").map(str::to_string),
            StreamEvent::Stanza(stanza) => return Err(refusal(&stanza)),
            StreamEvent::Closed => return Err(ComponentError::Closed),
        };
        // A server that gives no id (or a stream error in its place) refuses us.
        let id = match id {
            Some(id) => id,
            None => match reader.next().await? {
                StreamEvent::Stanza(stanza) => return Err(refusal(&stanza)),
                _ => return Err(ComponentError::Refused("no stream id".into())),
            },
        };
        let handshake = format!("<handshake>{}</handshake>", handshake_digest(&id, secret));
        writer.write_all(handshake.as_bytes()).await?;
        match reader.next().await? {
            StreamEvent::Stanza(stanza) if stanza.name == "handshake" => {}
            StreamEvent::Stanza(stanza) => return Err(refusal(&stanza)),
            _ => return Err(ComponentError::Closed),
        }
        let (tx, incoming) = mpsc::channel(64);
        tokio::spawn(async move {
            loop {
                let next = match reader.next().await {
                    Ok(StreamEvent::Stanza(stanza)) => Ok(stanza),
                    Ok(StreamEvent::Closed) | Ok(StreamEvent::Open(_)) => {
                        Err(ComponentError::Closed)
                    }
                    Err(e) => Err(e.into()),
                };
                let end = next.is_err();
                if tx.send(next).await.is_err() || end {
                    return;
                }
            }
        });
        Ok(Component { writer, incoming })
    }

    /// Hands `stanza` to the server: written and flushed to the connection.
    pub async fn send(&mut self, stanza: &str) -> Result<(), ComponentError> {
        let write = async {
            self.writer.write_all(stanza.as_bytes()).await?;
            self.writer.flush().await
        };
        match tokio::time::timeout(WRITE_TIMEOUT, write).await {
            Ok(result) => Ok(result?),
            Err(_) => Err(ComponentError::WriteTimeout),
        }
    }

    /// Ends the stream politely; the server then closes the connection.
    pub async fn close(mut self) {
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            let _ = self.writer.write_all(b"</stream:stream>").await;
            let _ = self.writer.shutdown().await;
        })
        .await;
    }
}

/// The reason in a stream error (`conflict`, `not-authorized`…), or the element's name.
fn refusal(stanza: &Element) -> ComponentError {
    if stanza.local_name() == "error" {
        let condition = stanza
            .children
            .iter()
            .find(|c| c.local_name() != "text")
            .map(|c| c.local_name().to_string())
            .unwrap_or_else(|| "stream error".into());
        ComponentError::Refused(condition)
    } else {
        ComponentError::Refused(format!("unexpected <{}>", stanza.name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_handshake_is_sha1_of_id_and_secret() {
        // SHA-1("abc"), split between stream id and secret: the order is id first.
        assert_eq!(
            handshake_digest("a", "bc"),
            "a9993e364706816aba3e25717850c26c9cd0d89d"
        );
        assert_ne!(handshake_digest("bc", "a"), handshake_digest("a", "bc"));
    }
}
