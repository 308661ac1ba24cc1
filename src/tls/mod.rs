//! HTTPS: certificates on disk ([`certs`]), the table handshakes choose
//! from by SNI ([`store`]) and the ACME HTTP-01 answers the plain listener
//! gives ([`challenge`]).

pub mod certs;
pub mod challenge;
pub mod handshake;
pub mod http;
pub mod preface;
pub mod store;
