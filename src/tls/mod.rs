//! HTTPS: certificates on disk ([`certs`]), the table handshakes choose
//! from by SNI ([`store`]) and the ACME HTTP-01 answers the plain listener
//! gives ([`challenge`]).

pub mod acme;
pub mod certs;
pub mod challenge;
pub mod renewal;
pub mod store;
