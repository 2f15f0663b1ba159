//! Sylk Pushserver v2: device tokens stored per account, and pushes to every device of an
//! account (or one of them), fanned out as one job per device. Minus the reference's bugs:
//! device ids are stored exactly as given, an unknown account or device is a 404 naming what was
//! asked for, messages are deterministic, and a device whose push would not validate stops the
//! request before anything is sent.

mod push;
mod tokens;

pub use push::{push_account, push_device};
pub use tokens::{add_token, list_tokens, remove_token};
