//! HTTPS: certificates on disk ([`certs`]), the table handshakes choose
//! from by SNI ([`store`]), the handshake itself inside the slow-client
//! deadline ([`handshake`], [`preface`]), the ACME HTTP-01 answers the plain
//! listener gives ([`challenge`]), and what requests see of TLS: redirect,
//! challenge answers and HSTS ([`http`]).

pub mod certs;
pub mod challenge;
pub mod handshake;
pub mod http;
pub mod preface;
pub mod store;
