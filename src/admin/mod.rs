//! The admin API (deploy tooling's door into switchyard) and its client.

pub mod api;
pub mod auth;
pub mod client;
pub mod deploy_client;
