//! Where one request goes while a service's traffic is split between its
//! colors (a canary), and what keeps a client on one side (`sticky`).
//!
//! A client belongs to a bucket, 0 to 99; [`Weights::color_for`] sends the
//! lowest `green` buckets to green. With `sticky = "client_ip"` the bucket
//! is a hash of the client's address, the same on every instance; with
//! `sticky = "cookie"` it is drawn once at random and kept by the client in
//! a cookie. Either way a client's color only changes when the weights
//! move past its bucket, so nobody bounces between versions mid-session.
//! Outside a split none of this runs: the request takes the active pool.

use std::net::IpAddr;
use std::time::Duration;

use http::HeaderValue;
use pingora::http::RequestHeader;

use crate::config::Sticky;
use crate::limits::key::client_key;
use crate::pools::{ServiceState, Weights};

/// The cookie carrying a client's bucket (`sticky = "cookie"`).
pub const COOKIE: &str = "switchyard-bucket";

/// How long a client keeps its bucket cookie (7 days): longer than any
/// canary, so a returning user lands where they were.
pub const COOKIE_MAX_AGE: Duration = Duration::from_secs(7 * 24 * 3600);

/// Where a request goes during a split.
#[derive(Debug, Default)]
pub struct Placement {
    /// The client's bucket (0..100); `None`: not sticky, spread evenly.
    pub bucket: Option<u8>,
    /// A `Set-Cookie` value for the response, when the client had no
    /// (valid) bucket cookie yet.
    pub set_cookie: Option<HeaderValue>,
}

/// Places one request of `state`'s service. `client` is the client's
/// address after `trusted_proxies`; `https` adds `Secure` to the cookie.
pub fn place(state: &ServiceState, req: &RequestHeader, client: IpAddr, https: bool) -> Placement {
    if state.canary().is_none() {
        return Placement::default();
    }
    match state.sticky {
        None => Placement::default(),
        Some(Sticky::ClientIp) => Placement {
            bucket: Some(ip_bucket(client)),
            set_cookie: None,
        },
        Some(Sticky::Cookie) => match cookie_bucket(req) {
            Some(bucket) => Placement {
                bucket: Some(bucket),
                set_cookie: None,
            },
            None => {
                let bucket = rand::random_range(0..Weights::BUCKETS);
                Placement {
                    bucket: Some(bucket),
                    set_cookie: Some(set_cookie(bucket, https)),
                }
            }
        },
    }
}

/// The bucket of a client address: a fixed mix of its bits (IPv6 by its
/// /64, which one host usually holds whole), so every instance and every
/// restart agrees.
pub fn ip_bucket(ip: IpAddr) -> u8 {
    let bits = match client_key(ip) {
        IpAddr::V4(v4) => u64::from(u32::from(v4)),
        IpAddr::V6(v6) => (u128::from(v6) >> 64) as u64,
    };
    (mix(bits) % u64::from(Weights::BUCKETS)) as u8
}

/// SplitMix64's finalizer: nearby addresses land in unrelated buckets.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The bucket in the request's [`COOKIE`], if it carries a valid one
/// (RFC 6265 §5.4: `name=value` pairs separated by `; `, in one or more
/// `Cookie` fields). Anything else is ignored and a new bucket is drawn.
pub fn cookie_bucket(req: &RequestHeader) -> Option<u8> {
    req.headers
        .get_all(http::header::COOKIE)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b';'))
        .filter_map(|pair| {
            let pair = pair.trim_ascii();
            let value = pair.strip_prefix(COOKIE.as_bytes())?.strip_prefix(b"=")?;
            std::str::from_utf8(value).ok()?.parse::<u8>().ok()
        })
        .find(|&b| b < Weights::BUCKETS)
}

/// `Set-Cookie` for `bucket` (RFC 6265 §4.1): the whole site, not readable
/// by scripts, sent on top-level navigation (`SameSite=Lax`), `Secure`
/// over HTTPS.
fn set_cookie(bucket: u8, https: bool) -> HeaderValue {
    let secure = if https { "; Secure" } else { "" };
    let value = format!(
        "{COOKIE}={bucket}; Path=/; Max-Age={}; HttpOnly; SameSite=Lax{secure}",
        COOKIE_MAX_AGE.as_secs()
    );
    HeaderValue::from_str(&value).unwrap_or_else(|_| HeaderValue::from_static(""))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(cookies: &[&str]) -> RequestHeader {
        let mut r = RequestHeader::build("GET", b"/", None).unwrap();
        for c in cookies {
            r.append_header("cookie", *c).unwrap();
        }
        r
    }

    #[test]
    fn cookie_buckets_are_read_from_any_cookie_field() {
        assert_eq!(cookie_bucket(&req(&["switchyard-bucket=7"])), Some(7));
        assert_eq!(
            cookie_bucket(&req(&["a=1; switchyard-bucket=42; b=2"])),
            Some(42)
        );
        assert_eq!(
            cookie_bucket(&req(&["a=1", "switchyard-bucket=99"])),
            Some(99)
        );
        for bad in [
            "switchyard-bucket=100",
            "switchyard-bucket=-1",
            "switchyard-bucket=",
            "switchyard-bucketx=3",
            "xswitchyard-bucket=3",
            "switchyard-bucket=1 2",
        ] {
            assert_eq!(cookie_bucket(&req(&[bad])), None, "{bad}");
        }
        // A bad copy does not hide a good one.
        assert_eq!(
            cookie_bucket(&req(&["switchyard-bucket=abc; switchyard-bucket=5"])),
            Some(5)
        );
    }

    #[test]
    fn ip_buckets_are_stable_and_spread() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(ip_bucket(ip("192.0.2.1")), ip_bucket(ip("192.0.2.1")));
        assert_eq!(
            ip_bucket(ip("::ffff:192.0.2.1")),
            ip_bucket(ip("192.0.2.1"))
        );
        // One /64 is one client.
        assert_eq!(
            ip_bucket(ip("2001:db8:0:1::1")),
            ip_bucket(ip("2001:db8:0:1::ffff"))
        );
        let mut seen = [0u32; 100];
        for n in 0..10_000u32 {
            seen[usize::from(ip_bucket(IpAddr::from(n.to_be_bytes())))] += 1;
        }
        // Consecutive addresses fill every bucket, none grossly over.
        assert!(seen.iter().all(|&c| (50..=150).contains(&c)), "{seen:?}");
    }

    #[test]
    fn the_cookie_is_scoped_and_secure_over_https() {
        let plain = set_cookie(12, false);
        assert_eq!(
            plain.to_str().unwrap(),
            "switchyard-bucket=12; Path=/; Max-Age=604800; HttpOnly; SameSite=Lax"
        );
        assert!(set_cookie(12, true).to_str().unwrap().ends_with("; Secure"));
    }
}
