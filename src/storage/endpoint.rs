//! The store's address (`[storage] endpoint`): where the S3 endpoint's requests are
//! proxied to, unchanged (CONTRACT §12).

use std::fmt;

/// `http(s)://host[:port]` of the S3-compatible store, taken apart once at load.
#[derive(Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// `https:` (the edge connects with TLS and checks the store's certificate).
    pub tls: bool,
    /// The host name or IP address (brackets of an IPv6 literal removed).
    pub host: String,
    pub port: u16,
}

impl fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}:{}", if self.tls { "https" } else { "http" }, self.host, self.port)
    }
}

impl Endpoint {
    /// Reads `http://host[:port]` or `https://host[:port]` (a trailing `/` allowed; no
    /// path, query, user or password: requests keep their own path).
    pub fn parse(url: &str) -> Result<Endpoint, String> {
        let (tls, rest) = if let Some(r) = url.strip_prefix("https://") {
            (true, r)
        } else if let Some(r) = url.strip_prefix("http://") {
            (false, r)
        } else {
            return Err(format!("`{url}` must start with http:// or https://"));
        };
        let authority = rest.strip_suffix('/').unwrap_or(rest);
        if authority.is_empty()
            || authority.contains(['/', '?', '#', '@'])
            || authority.chars().any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(format!("`{url}` must be a scheme, a host and an optional port, without a path"));
        }
        let default_port = if tls { 443 } else { 80 };
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (addr, after) = v6.split_once(']').ok_or_else(|| format!("`{url}`: unclosed `[`"))?;
            addr.parse::<std::net::Ipv6Addr>().map_err(|_| format!("`{url}`: `{addr}` is not an IPv6 address"))?;
            let port = match after {
                "" => default_port,
                p => parse_port(p.strip_prefix(':').ok_or_else(|| format!("`{url}`: junk after `]`"))?, url)?,
            };
            (addr.to_string(), port)
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h.to_string(), parse_port(p, url)?),
                None => (authority.to_string(), default_port),
            }
        };
        let valid_host = !host.is_empty() && host.len() <= 253 && host.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b));
        if !valid_host && host.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(format!("`{url}`: `{host}` is not a host name"));
        }
        Ok(Endpoint { tls, host: host.to_ascii_lowercase(), port })
    }

    /// `host:port` to connect to (brackets around an IPv6 address).
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

fn parse_port(p: &str, url: &str) -> Result<u16, String> {
    p.parse::<u16>().ok().filter(|p| *p > 0).ok_or_else(|| format!("`{url}`: `{p}` is not a port (1-65535)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse_with_default_ports_and_refuse_paths() {
        let e = Endpoint::parse("http://127.0.0.1:9000").unwrap();
        assert_eq!((e.tls, e.host.as_str(), e.port), (false, "127.0.0.1", 9000));
        let e = Endpoint::parse("https://S3.Example.com/").unwrap();
        assert_eq!((e.tls, e.host.as_str(), e.port), (true, "s3.example.com", 443));
        assert_eq!(e.authority(), "s3.example.com:443");
        let e = Endpoint::parse("http://[::1]:9000").unwrap();
        assert_eq!((e.host.as_str(), e.port, e.authority()), ("::1", 9000, "[::1]:9000".to_string()));
        for bad in ["ftp://x", "http://", "http://h/path", "http://u:p@h", "http://h:0", "http://h:99999", "http://h x", "http://[::1", "x"]
        {
            assert!(Endpoint::parse(bad).is_err(), "{bad} should be refused");
        }
    }
}
