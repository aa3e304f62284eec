//! The appliance's services, served on every interface.
//!
//! Each service owns some smoltcp sockets in its interface's socket set and is polled by
//! the interface after smoltcp has processed what arrived; it reports whether it queued
//! anything to send and when it next needs attention (its timeouts).

pub mod echo;
pub mod http;
pub mod json;
pub mod status;
