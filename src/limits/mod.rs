//! Limits that keep a flood of clients from becoming an outage or a bill.
//! Each is checked in `request_filter`, before anything reaches a backend.

pub mod concurrency;
pub mod key;
pub mod rate;
