// Copyright 2026 Cloudflare, Inc.
//
// Licensed under the Apache License, Version 2.0 (the "License");
// you may not use this file except in compliance with the License.
// You may obtain a copy of the License at
//
// http://www.apache.org/licenses/LICENSE-2.0
//
// Unless required by applicable law or agreed to in writing, software
// distributed under the License is distributed on an "AS IS" BASIS,
// WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
// See the License for the specific language governing permissions and
// limitations under the License.

use crate::*;
use bytes::Bytes;
use http::header;

#[derive(Debug, Clone)]
pub struct CaseHeaderName(Bytes);

impl CaseHeaderName {
    pub fn new(name: String) -> Self {
        CaseHeaderName(name.into())
    }
}

impl CaseHeaderName {
    pub fn as_slice(&self) -> &[u8] {
        &self.0
    }

    pub fn from_slice(buf: &[u8]) -> Self {
        CaseHeaderName(Bytes::copy_from_slice(buf))
    }

    /// miosa-edge patch: a name known when the program is built (no copy).
    pub const fn from_static(name: &'static str) -> Self {
        CaseHeaderName(Bytes::from_static(name.as_bytes()))
    }
}

/// A trait that converts into case-sensitive header names.
pub trait IntoCaseHeaderName {
    fn into_case_header_name(self) -> CaseHeaderName;

    /// miosa-edge patch: the name for lookups and the name as written. By default the
    /// written form is parsed into the lookup name; a [`HeaderName`] is one already, so
    /// it is not parsed again (for a standard name, neither form allocates).
    fn into_names(self) -> Result<(HeaderName, CaseHeaderName), http::header::InvalidHeaderName>
    where
        Self: Sized,
    {
        let case = self.into_case_header_name();
        let name = HeaderName::from_bytes(case.as_slice())?;
        Ok((name, case))
    }

    /// miosa-edge patch (pingora-http 10): the name for lookups alone, for a head that
    /// keeps no names as written; a [`HeaderName`] is returned as it is, without building
    /// a written form only to drop it.
    fn into_name(self) -> Result<HeaderName, http::header::InvalidHeaderName>
    where
        Self: Sized,
    {
        self.into_names().map(|(name, _)| name)
    }
}

impl IntoCaseHeaderName for CaseHeaderName {
    fn into_case_header_name(self) -> CaseHeaderName {
        self
    }
}

impl IntoCaseHeaderName for String {
    fn into_case_header_name(self) -> CaseHeaderName {
        CaseHeaderName(self.into())
    }
}

impl IntoCaseHeaderName for &'static str {
    fn into_case_header_name(self) -> CaseHeaderName {
        CaseHeaderName(self.into())
    }
}

impl IntoCaseHeaderName for HeaderName {
    fn into_case_header_name(self) -> CaseHeaderName {
        CaseHeaderName(titled_header_name(&self))
    }

    fn into_names(self) -> Result<(HeaderName, CaseHeaderName), http::header::InvalidHeaderName> {
        let case = CaseHeaderName(titled_header_name(&self));
        Ok((self, case))
    }

    fn into_name(self) -> Result<HeaderName, http::header::InvalidHeaderName> {
        Ok(self)
    }
}

impl IntoCaseHeaderName for &HeaderName {
    fn into_case_header_name(self) -> CaseHeaderName {
        CaseHeaderName(titled_header_name(self))
    }

    fn into_names(self) -> Result<(HeaderName, CaseHeaderName), http::header::InvalidHeaderName> {
        Ok((self.clone(), CaseHeaderName(titled_header_name(self))))
    }

    fn into_name(self) -> Result<HeaderName, http::header::InvalidHeaderName> {
        Ok(self.clone())
    }
}

impl IntoCaseHeaderName for Bytes {
    fn into_case_header_name(self) -> CaseHeaderName {
        CaseHeaderName(self)
    }
}

fn titled_header_name(header_name: &HeaderName) -> Bytes {
    titled_header_name_str(header_name).map_or_else(
        || Bytes::copy_from_slice(header_name.as_str().as_bytes()),
        |s| Bytes::from_static(s.as_bytes()),
    )
}

pub(crate) fn titled_header_name_str(header_name: &HeaderName) -> Option<&'static str> {
    Some(match *header_name {
        header::ACCEPT_RANGES => "Accept-Ranges",
        header::AGE => "Age",
        header::CACHE_CONTROL => "Cache-Control",
        header::CONNECTION => "Connection",
        header::CONTENT_TYPE => "Content-Type",
        header::CONTENT_ENCODING => "Content-Encoding",
        header::CONTENT_LENGTH => "Content-Length",
        header::DATE => "Date",
        header::TRANSFER_ENCODING => "Transfer-Encoding",
        header::HOST => "Host",
        header::SERVER => "Server",
        header::SET_COOKIE => "Set-Cookie",
        // miosa-edge patch (pingora-http 9): more of the names a server writes, in their
        // usual case (those canonical casing would get wrong first).
        header::ETAG => "ETag",
        header::WWW_AUTHENTICATE => "WWW-Authenticate",
        header::CONTENT_SECURITY_POLICY => "Content-Security-Policy",
        header::X_CONTENT_TYPE_OPTIONS => "X-Content-Type-Options",
        header::LAST_MODIFIED => "Last-Modified",
        header::LOCATION => "Location",
        header::VARY => "Vary",
        header::ALLOW => "Allow",
        header::RETRY_AFTER => "Retry-After",
        header::REFERRER_POLICY => "Referrer-Policy",
        header::CONTENT_RANGE => "Content-Range",
        header::EXPIRES => "Expires",
        header::STRICT_TRANSPORT_SECURITY => "Strict-Transport-Security",
        // TODO: add more const header here to map to their titled case
        // TODO: automatically upper case the first letter?
        _ => {
            return None;
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_case_header_name() {
        assert_eq!("FoO".into_case_header_name().as_slice(), b"FoO");
        assert_eq!("FoO".to_string().into_case_header_name().as_slice(), b"FoO");
        assert_eq!(header::SERVER.into_case_header_name().as_slice(), b"Server");
    }
}
