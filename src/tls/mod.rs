//! HTTPS: certificates on disk ([`certs`]), the table handshakes choose
//! from by SNI ([`store`]).

pub mod certs;
pub mod store;
