//! Just enough XML for XMPP streams: a reader that turns a stream into its header and then one
//! complete element per top-level stanza, and escaping for what is written. Names are kept as
//! written (`stream:error`); namespaces are read from `xmlns` attributes where they matter.

use quick_xml::events::{BytesStart, Event};
use quick_xml::Reader;
use tokio::io::AsyncBufRead;

/// The largest stanza accepted: a peer sending more is cut off instead of filling memory.
pub const MAX_STANZA_BYTES: usize = 256 * 1024;

/// One element with its attributes, child elements and text (the text of its direct children
/// only, concatenated).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Element {
    pub name: String,
    pub attrs: Vec<(String, String)>,
    pub children: Vec<Element>,
    pub text: String,
}

impl Element {
    pub fn attr(&self, name: &str) -> Option<&str> {
        self.attrs
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The name without its prefix (`error` for `stream:error`).
    pub fn local_name(&self) -> &str {
        self.name.rsplit(':').next().unwrap_or(&self.name)
    }

    /// The first child with this local name.
    pub fn child(&self, local_name: &str) -> Option<&Element> {
        self.children.iter().find(|c| c.local_name() == local_name)
    }

    /// The first child with this local name and `xmlns`.
    pub fn child_ns(&self, local_name: &str, ns: &str) -> Option<&Element> {
        self.children
            .iter()
            .find(|c| c.local_name() == local_name && c.attr("xmlns") == Some(ns))
    }
}

/// What a stream brings.
#[derive(Debug, Clone, PartialEq)]
pub enum StreamEvent {
    /// The `<stream:stream>` header, with its attributes.
    Open(Element),
    /// A complete top-level element.
    Stanza(Element),
    /// `</stream:stream>` or the end of the connection.
    Closed,
}

#[derive(Debug, thiserror::Error)]
pub enum XmlError {
    #[error("malformed XML: {0}")]
    Malformed(String),
    #[error("a stanza larger than {MAX_STANZA_BYTES} bytes")]
    TooLarge,
}

/// Reads an XMPP stream stanza by stanza. Not cancel-safe: read it from one task.
pub struct StreamReader<R> {
    reader: Reader<R>,
    buf: Vec<u8>,
    /// Elements open inside the current stanza, outermost first.
    open: Vec<Element>,
    in_stream: bool,
    stanza_bytes: usize,
}

impl<R: AsyncBufRead + Unpin> StreamReader<R> {
    pub fn new(inner: R) -> StreamReader<R> {
        let mut reader = Reader::from_reader(inner);
        reader.config_mut().trim_text(false);
        // A restarted stream opens a second header inside the first, never closed.
        reader.config_mut().check_end_names = false;
        StreamReader {
            reader,
            buf: Vec::new(),
            open: Vec::new(),
            in_stream: false,
            stanza_bytes: 0,
        }
    }

    pub async fn next(&mut self) -> Result<StreamEvent, XmlError> {
        loop {
            self.buf.clear();
            let before = self.reader.buffer_position();
            let event = self
                .reader
                .read_event_into_async(&mut self.buf)
                .await
                .map_err(|e| XmlError::Malformed(e.to_string()))?;
            if !self.open.is_empty() {
                self.stanza_bytes += (self.reader.buffer_position() - before) as usize;
                if self.stanza_bytes > MAX_STANZA_BYTES {
                    return Err(XmlError::TooLarge);
                }
            }
            match event {
                Event::Start(start) => {
                    let element = element(&start)?;
                    // The first header, or a new one after SASL or TLS (a stream restart).
                    if !self.in_stream || (self.open.is_empty() && element.local_name() == "stream")
                    {
                        self.in_stream = true;
                        return Ok(StreamEvent::Open(element));
                    }
                    if self.open.is_empty() {
                        self.stanza_bytes = 0;
                    }
                    self.open.push(element);
                }
                Event::Empty(start) => {
                    let element = element(&start)?;
                    if !self.in_stream {
                        return Err(XmlError::Malformed("an empty stream header".into()));
                    }
                    if let Some(done) = self.close(element) {
                        return Ok(StreamEvent::Stanza(done));
                    }
                }
                Event::End(_) => match self.open.pop() {
                    None => return Ok(StreamEvent::Closed),
                    Some(element) => {
                        if let Some(done) = self.close(element) {
                            return Ok(StreamEvent::Stanza(done));
                        }
                    }
                },
                Event::Text(text) => {
                    if let Some(current) = self.open.last_mut() {
                        let text = text
                            .unescape()
                            .map_err(|e| XmlError::Malformed(e.to_string()))?;
                        current.text.push_str(&text);
                    }
                }
                Event::CData(data) => {
                    if let Some(current) = self.open.last_mut() {
                        current
                            .text
                            .push_str(&String::from_utf8_lossy(&data.into_inner()));
                    }
                }
                Event::Eof => return Ok(StreamEvent::Closed),
                // The XML declaration, comments, processing instructions: nothing to keep.
                _ => {}
            }
        }
    }

    /// Attaches a finished element to its parent; the stanza itself when it was top-level.
    fn close(&mut self, element: Element) -> Option<Element> {
        match self.open.last_mut() {
            Some(parent) => {
                parent.children.push(element);
                None
            }
            None => Some(element),
        }
    }
}

fn element(start: &BytesStart<'_>) -> Result<Element, XmlError> {
    let name = String::from_utf8_lossy(start.name().as_ref()).into_owned();
    let mut attrs = Vec::new();
    for attr in start.attributes() {
        let attr = attr.map_err(|e| XmlError::Malformed(e.to_string()))?;
        let key = String::from_utf8_lossy(attr.key.as_ref()).into_owned();
        let value = attr
            .unescape_value()
            .map_err(|e| XmlError::Malformed(e.to_string()))?
            .into_owned();
        attrs.push((key, value));
    }
    Ok(Element {
        name,
        attrs,
        ..Default::default()
    })
}

/// Text or an attribute value, escaped for XML.
pub fn escape(text: &str) -> std::borrow::Cow<'_, str> {
    quick_xml::escape::escape(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_stream_reads_as_header_then_stanzas() {
        let text = "<?xml version='1.0'?><stream:stream xmlns='jabber:component:accept' \
            xmlns:stream='http://etherx.jabber.org/streams' id='abc' from='up.localhost'>\n \
            <handshake/><iq type='set' id='1' from='a@b/c'><register xmlns='unifiedpush.org'>\
            <token>t&amp;1</token></register></iq> <message><body><![CDATA[x<y]]></body></message>\
            </stream:stream>";
        let mut reader = StreamReader::new(text.as_bytes());
        let StreamEvent::Open(header) = reader.next().await.unwrap() else {
            panic!("no header")
        };
        assert_eq!(header.attr("id"), Some("abc"));
        assert_eq!(header.local_name(), "stream");
        let StreamEvent::Stanza(handshake) = reader.next().await.unwrap() else {
            panic!("no handshake")
        };
        assert_eq!(handshake.name, "handshake");
        let StreamEvent::Stanza(iq) = reader.next().await.unwrap() else {
            panic!("no iq")
        };
        assert_eq!(iq.attr("from"), Some("a@b/c"));
        let register = iq.child_ns("register", "unifiedpush.org").unwrap();
        assert_eq!(register.child("token").unwrap().text, "t&1");
        let StreamEvent::Stanza(message) = reader.next().await.unwrap() else {
            panic!("no message")
        };
        assert_eq!(message.child("body").unwrap().text, "x<y");
        assert_eq!(reader.next().await.unwrap(), StreamEvent::Closed);
    }

    #[tokio::test]
    async fn a_restarted_stream_opens_again() {
        let text = "<stream:stream id='1'><success/><?xml version='1.0'?><stream:stream id='2'>\
            <features/>";
        let mut reader = StreamReader::new(text.as_bytes());
        assert!(
            matches!(reader.next().await, Ok(StreamEvent::Open(h)) if h.attr("id") == Some("1"))
        );
        assert!(matches!(reader.next().await, Ok(StreamEvent::Stanza(s)) if s.name == "success"));
        assert!(
            matches!(reader.next().await, Ok(StreamEvent::Open(h)) if h.attr("id") == Some("2"))
        );
        assert!(matches!(reader.next().await, Ok(StreamEvent::Stanza(s)) if s.name == "features"));
    }

    #[tokio::test]
    async fn malformed_xml_is_an_error() {
        let mut reader = StreamReader::new("<stream:stream><iq type=set>".as_bytes());
        assert!(matches!(reader.next().await, Ok(StreamEvent::Open(_))));
        assert!(reader.next().await.is_err());
    }

    #[test]
    fn text_is_escaped() {
        assert_eq!(escape("a<b&'\""), "a&lt;b&amp;&apos;&quot;");
    }
}
