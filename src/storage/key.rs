//! From a request path to an object key.

use object_store::path::Path;

/// The longest key S3 accepts (bytes of UTF-8); a longer one cannot name an object.
const MAX_KEY_BYTES: usize = 1024;

/// The object key a request path names: the path without its query and without its
/// leading `/`, percent-decoded exactly once (`/a%2Fb` → `a/b`, `/%2541` → `%41`).
///
/// `None` (the caller answers 404 `object_not_found`) when the path does not start
/// with `/`, has a bad escape (`%` not followed by two hex digits), decodes to invalid
/// UTF-8, is empty, is longer than S3's 1024 bytes, or names a key `object_store`'s
/// [`Path`] cannot express exactly: an empty segment (`a//b`, a leading or trailing `/`
/// after decoding), a `.` or `..` segment, or an ASCII control character. Such keys
/// would either be refused by the store or silently become another key (`Path::parse`
/// strips a trailing `/`), so they are never asked for.
pub fn key_of(path: &[u8]) -> Option<String> {
    let path = match path.iter().position(|b| *b == b'?') {
        Some(i) => &path[..i],
        None => path,
    };
    let raw = path.strip_prefix(b"/")?;
    let key = String::from_utf8(percent_decode(raw)?).ok()?;
    if key.is_empty() || key.len() > MAX_KEY_BYTES {
        return None;
    }
    let parsed = Path::parse(&key).ok()?;
    (parsed.as_ref() == key).then_some(key)
}

/// `raw` with every `%XX` replaced by its byte, once; `None` for a malformed escape.
pub(super) fn percent_decode(raw: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while let Some(&b) = raw.get(i) {
        if b == b'%' {
            let hex = raw.get(i + 1..i + 3)?;
            out.push(hex_digit(hex[0])? << 4 | hex_digit(hex[1])?);
            i += 3;
        } else {
            out.push(b);
            i += 1;
        }
    }
    Some(out)
}

fn hex_digit(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}
