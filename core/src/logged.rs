//! How values from outside appear in log lines. A caller's identity (a SIP URI, a phone
//! number, an account) is personal data: logs show a fingerprint of it unless
//! `[log] identities = true`, and the fingerprint still follows one person across lines.
//! Any value a caller chose has its control characters escaped, so that a CR/LF cannot forge a
//! log line of its own.

use std::fmt::{self, Display, Write};
use std::sync::atomic::{AtomicBool, Ordering};

use crate::tokens::token_fingerprint;

static SHOW_IDENTITIES: AtomicBool = AtomicBool::new(false);

/// Whether log lines show identities in full (`[log] identities`); set once at start-up.
pub fn show_identities(show: bool) {
    SHOW_IDENTITIES.store(show, Ordering::Relaxed);
}

/// A caller's identity, as a log line may show it.
pub struct Identity<'a>(pub &'a str);

impl Display for Identity<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if SHOW_IDENTITIES.load(Ordering::Relaxed) {
            Escaped(self.0).fmt(f)
        } else {
            write!(f, "id:{}", &token_fingerprint(self.0)[..8])
        }
    }
}

/// A value a caller chose, with its control characters escaped.
pub struct Escaped<'a>(pub &'a str);

impl Display for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.0.chars().any(char::is_control) {
            return f.write_str(self.0);
        }
        for c in self.0.chars() {
            if c.is_control() {
                write!(f, "{}", c.escape_default())?;
            } else {
                f.write_char(c)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_cannot_start_a_line() {
        assert_eq!(
            Escaped("a\r\nINFO forged\u{1b}[2J").to_string(),
            "a\\r\\nINFO forged\\u{1b}[2J"
        );
        assert_eq!(
            Escaped("plain sip:bob@example.com").to_string(),
            "plain sip:bob@example.com"
        );
    }

    #[test]
    fn identities_are_fingerprints_unless_asked_for() {
        show_identities(false);
        let shown = Identity("sip:+15551234567@example.com").to_string();
        assert!(shown.starts_with("id:") && shown.len() == 11, "{shown}");
        assert!(!shown.contains("5551234567"));
        assert_eq!(shown, Identity("sip:+15551234567@example.com").to_string());
        show_identities(true);
        assert_eq!(
            Identity("sip:bob@example.com\n").to_string(),
            "sip:bob@example.com\\n"
        );
        show_identities(false);
    }
}
