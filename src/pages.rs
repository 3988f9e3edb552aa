//! Edge-generated responses (CONTRACT §5): branded HTML pages or JSON errors.
//!
//! Each branding (the platform's, a neutral one for tenant hosts of unbranded
//! workspaces, and one per distinct workspace branding) is rendered — and escaped —
//! once when a route table is built, into a page head and foot. A response joins head,
//! the code's pre-escaped text, a few digits (port) and the request id, so no request
//! renders a template. Branded pages never name the platform.

use crate::access::PASSWORD_PATH;
use crate::answer::Detail;
use crate::codes::ErrorCode;
use crate::schema::PlatformBranding;
use crate::schema::WorkspaceBranding;
use bytes::Bytes;
use std::collections::HashMap;
use std::fmt::Write;
use std::sync::Arc;

/// A page's title for `code`.
fn title(code: ErrorCode) -> &'static str {
    match code {
        ErrorCode::InvalidHost | ErrorCode::BadRequest => "Bad request",
        ErrorCode::UriTooLong => "Address too long",
        ErrorCode::RequestHeaderTooLarge => "Request too large",
        ErrorCode::RequestTimeout => "Request timed out",
        ErrorCode::UnknownHost => "Nothing here yet",
        ErrorCode::NotFound => "Page not found",
        ErrorCode::PreviewNotFound => "Preview not found",
        ErrorCode::DomainNotVerified => "Domain not verified",
        ErrorCode::PreviewAuthRequired => "This preview is private",
        ErrorCode::PreviewTokenInvalid => "This link is not valid",
        ErrorCode::PreviewTokenExpired => "This link has expired",
        ErrorCode::ShareTokenInvalid => "This share link is not valid",
        ErrorCode::ShareTokenExpired => "This share link has expired",
        ErrorCode::SharePasswordRequired => "Password required",
        ErrorCode::TooManyAttempts => "Too many attempts",
        ErrorCode::SandboxUnavailable => "Nothing is answering",
        ErrorCode::SandboxStarting => "Starting up",
        ErrorCode::UpstreamTimeout => "The server took too long",
        ErrorCode::NoHealthyInstance => "Temporarily unavailable",
        ErrorCode::ReleaseUnavailable => "Temporarily unavailable",
        ErrorCode::ObjectNotFound => "File not found",
        ErrorCode::StorageUnavailable => "Temporarily unavailable",
        ErrorCode::InternalError => "Something went wrong",
    }
}

/// HTML paragraphs explaining the failure (static text; details are escaped digits).
fn explain(code: ErrorCode, d: Detail, out: &mut String) {
    match code {
            ErrorCode::InvalidHost => out.push_str("<p>The request did not name a valid host name, so it cannot be routed.</p>"),
            ErrorCode::BadRequest => {
                out.push_str("<p>The request is malformed or ambiguous, so it was not forwarded. Try again from a regular browser.</p>")
            }
            ErrorCode::UriTooLong => out.push_str("<p>The address of this request is too long. Shorten the link and try again.</p>"),
            ErrorCode::RequestHeaderTooLarge => out.push_str(
                "<p>The request carries too many or too large headers. Clearing this site's cookies usually fixes it.</p>",
            ),
            ErrorCode::RequestTimeout => out.push_str("<p>The request was not received in time. Check your connection and try again.</p>"),
            ErrorCode::UnknownHost => out.push_str(
                "<p>No app or preview is connected to this address. Check the URL for typos; if you just set it up, it may take a moment to appear.</p>",
            ),
            ErrorCode::NotFound => {
                out.push_str("<p>This app has no page at this address. Check the link for typos.</p>")
            }
            ErrorCode::PreviewNotFound => out.push_str(
                "<p>There is no preview for this sandbox and port. Check the port number at the start of the address: a port must be exposed as a preview before it can be opened.</p>",
            ),
            ErrorCode::DomainNotVerified => out.push_str(
                "<p>This domain is connected, but its DNS records have not been verified yet. If you own it, finish the domain set-up; DNS changes can take a few minutes to be seen.</p>",
            ),
            ErrorCode::PreviewAuthRequired => out.push_str(
                "<p>Open it with the link you were given (it carries an access token), or open it from your workspace.</p>",
            ),
            ErrorCode::PreviewTokenInvalid => out.push_str(
                "<p>The access token in this link is not valid for this preview: it may be damaged, or made for another sandbox or port. Open the preview again from your workspace to get a fresh link.</p>",
            ),
            ErrorCode::PreviewTokenExpired => {
                out.push_str("<p>The access token in this link has expired. Open the preview again from your workspace to get a fresh link.</p>")
            }
            ErrorCode::ShareTokenInvalid => out.push_str(
                "<p>This share link is unknown, has been revoked, or belongs to another preview. Ask the person who shared it for a new link.</p>",
            ),
            ErrorCode::ShareTokenExpired => {
                out.push_str("<p>This share link has expired. Ask the person who shared it for a new link.</p>")
            }
            ErrorCode::SharePasswordRequired => {
                out.push_str("<p>This share link is protected by a password. Open it in a browser to enter the password.</p>")
            }
            ErrorCode::TooManyAttempts => out.push_str(
                "<p>Too many wrong passwords were tried for this link. Wait a minute, then try again.</p>",
            ),
            ErrorCode::SandboxUnavailable if d.deployment => out.push_str(
                "<p>The app did not accept the connection or reset it. It may be restarting; try again in a moment.</p>",
            ),
            ErrorCode::SandboxUnavailable => {
                match d.port {
                    Some(p) => {
                        let _ = write!(out, "<p>The sandbox is running, but nothing is listening on port <strong>{p}</strong> (the connection was refused or reset).</p>");
                    }
                    None => out.push_str("<p>The sandbox is running, but nothing is listening on this port (the connection was refused or reset).</p>"),
                }
                out.push_str(
                    "<p>Start your dev server on that port. If it is already running, make sure it listens on <code>0.0.0.0</code> (all interfaces): a server bound to <code>127.0.0.1</code> or <code>localhost</code> cannot be reached from outside the sandbox. For Vite, use <code>vite --host 0.0.0.0</code>; for Next.js, <code>next dev -H 0.0.0.0</code>.</p>",
                );
            }
            ErrorCode::SandboxStarting => out.push_str(
                "<p>This sandbox was asleep and is waking up. This page retries by itself in a few seconds.</p>",
            ),
            ErrorCode::UpstreamTimeout => out.push_str(
                "<p>The server accepted the request but did not answer in time (timed out). It may be busy or stuck; try again, and check its logs if this keeps happening.</p>",
            ),
            ErrorCode::NoHealthyInstance => out.push_str("<p>Every instance of this app is failing its health checks. Try again in a moment.</p>"),
            ErrorCode::ReleaseUnavailable => out.push_str("<p>The files of this version of the app cannot be served right now. Try again in a moment.</p>"),
            ErrorCode::ObjectNotFound => out.push_str(
                "<p>There is no public file at this address. It may have been deleted, or it may be private: private files open only through a signed link.</p>",
            ),
            ErrorCode::StorageUnavailable => {
                out.push_str("<p>The file store did not accept the request or failed while answering it. Try again in a moment.</p>")
            }
            ErrorCode::InternalError => out.push_str("<p>The edge could not handle this request. Try again; if it persists, contact support with the request id below.</p>"),
        }
}

/// A pre-rendered branding.
#[derive(Debug, Clone)]
struct Rendered {
    head_open: String,
    /// The header block (logo or name), placed after `<title>…</title></head><body>`.
    header: String,
    foot: String,
}

/// Rendered brandings of one route table.
#[derive(Debug, Clone)]
pub struct Pages {
    brandings: Vec<Arc<Rendered>>,
    dedupe: HashMap<WorkspaceBranding, u32>,
}

const CSS: &str = "*{box-sizing:border-box}body{margin:0;font:16px/1.5 system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;color:#1c1c1e;background:#f6f6f8;display:flex;min-height:100vh;align-items:center;justify-content:center}main{max-width:36rem;margin:1.5rem;padding:2rem;background:#fff;border-radius:12px;box-shadow:0 1px 3px rgba(0,0,0,.08)}header{margin-bottom:1.25rem;min-height:8px}header img{max-height:40px;max-width:200px}header .name{font-weight:600;font-size:1.1rem}h1{font-size:1.4rem;margin:0 0 .75rem}code{background:#f0f0f3;padding:.1em .3em;border-radius:4px;font-size:.9em}.meta{color:#6e6e73;font-size:.85rem;margin-top:1.5rem}a{color:var(--accent)}.bar{height:4px;background:var(--accent);border-radius:2px;width:3rem}form{display:flex;flex-direction:column;gap:.75rem}input[type=password]{display:block;width:100%;margin-top:.25rem;padding:.5rem;font:inherit;border:1px solid #c7c7cc;border-radius:6px}button{padding:.55rem 1rem;font:inherit;color:#fff;background:var(--accent);border:0;border-radius:6px;cursor:pointer}.err{color:#c4281c}@media (prefers-color-scheme:dark){body{background:#1c1c1e;color:#f2f2f7}main{background:#2c2c2e}code{background:#3a3a3c}}";

/// The CSP of every edge page: no scripts, inline styles only, https images.
pub const PAGE_CSP: &str = "default-src 'none'; style-src 'unsafe-inline'; img-src https: data:; base-uri 'none'; form-action 'self'";

impl Pages {
    /// Index of the platform's own branding.
    pub const PLATFORM: u32 = 0;
    /// Index of the neutral branding (tenant host of an unbranded workspace).
    pub const NEUTRAL: u32 = 1;

    /// Renders the platform and neutral brandings.
    pub fn new(platform: &PlatformBranding) -> Pages {
        let platform_r = render(
            Some(&platform.name),
            platform.logo_url.as_ref().map(|u| u.as_str()),
            platform.accent_color.as_str(),
            platform.support_url.as_ref().map(|u| u.as_str()),
        );
        let neutral = render(None, None, "#6e6e73", None);
        Pages { brandings: vec![Arc::new(platform_r), Arc::new(neutral)], dedupe: HashMap::new() }
    }

    /// Renders a workspace's branding once (identical brandings share a rendering).
    /// The index of `b` if it is rendered already.
    pub fn find_workspace_branding(&self, b: &WorkspaceBranding) -> Option<u32> {
        self.dedupe.get(b).copied()
    }

    pub fn add_workspace_branding(&mut self, b: &WorkspaceBranding) -> u32 {
        if let Some(&i) = self.dedupe.get(b) {
            return i;
        }
        let r = render(
            None,
            b.logo_url.as_ref().map(|u| u.as_str()),
            b.accent_color.as_ref().map(|c| c.as_str()).unwrap_or("#6e6e73"),
            b.support_url.as_ref().map(|u| u.as_str()),
        );
        let i = self.brandings.len() as u32;
        self.brandings.push(Arc::new(r));
        self.dedupe.insert(b.clone(), i);
        i
    }

    /// The HTML page for `code` in `branding`.
    pub fn html(&self, branding: u32, code: ErrorCode, detail: Detail, request_id: &str) -> Bytes {
        let r = self.brandings.get(branding as usize).unwrap_or(&self.brandings[Self::NEUTRAL as usize]);
        let mut out = String::with_capacity(r.head_open.len() + r.header.len() + r.foot.len() + 1200);
        out.push_str(&r.head_open);
        if code == ErrorCode::SandboxStarting {
            out.push_str("<meta http-equiv=\"refresh\" content=\"5\">");
        }
        out.push_str("<title>");
        out.push_str(title(code));
        out.push_str("</title></head><body><main>");
        out.push_str(&r.header);
        out.push_str("<h1>");
        out.push_str(title(code));
        out.push_str("</h1>");
        explain(code, detail, &mut out);
        out.push_str("<p class=\"meta\">Error <code>");
        out.push_str(code.as_str());
        out.push_str("</code> · Request ID <code>");
        escape_into(request_id, &mut out);
        out.push_str("</code></p>");
        out.push_str(&r.foot);
        Bytes::from(out)
    }

    /// The password form of a protected share link (answered with 401): posts
    /// `password` and `next` to [`PASSWORD_PATH`]. `next` is the path to return to;
    /// `wrong` adds the wrong-password notice.
    pub fn password_form(&self, branding: u32, next: &str, wrong: bool, request_id: &str) -> Bytes {
        let r = self.brandings.get(branding as usize).unwrap_or(&self.brandings[Self::NEUTRAL as usize]);
        let mut out = String::with_capacity(r.head_open.len() + r.header.len() + r.foot.len() + 1200);
        out.push_str(&r.head_open);
        out.push_str("<title>Password required</title></head><body><main>");
        out.push_str(&r.header);
        out.push_str("<h1>Password required</h1><p>This preview was shared with a password. Enter it to continue.</p>");
        if wrong {
            out.push_str("<p class=\"err\" role=\"alert\">That password is not correct.</p>");
        }
        out.push_str("<form method=\"post\" action=\"");
        out.push_str(PASSWORD_PATH);
        out.push_str("\"><input type=\"hidden\" name=\"next\" value=\"");
        escape_into(next, &mut out);
        out.push_str(
            "\"><label>Password <input type=\"password\" name=\"password\" autocomplete=\"current-password\" required autofocus></label><button type=\"submit\">Continue</button></form>",
        );
        out.push_str("<p class=\"meta\">Request ID <code>");
        escape_into(request_id, &mut out);
        out.push_str("</code></p>");
        out.push_str(&r.foot);
        Bytes::from(out)
    }

    /// The JSON error body for `code`.
    pub fn json(code: ErrorCode) -> Bytes {
        // Written by hand to keep the contract's field order (status, code, message);
        // serde_json escapes the message.
        let message = serde_json::Value::from(code.message()).to_string();
        Bytes::from(format!("{{\"error\":{{\"status\":{},\"code\":\"{}\",\"message\":{message}}}}}", code.status(), code.as_str()))
    }
}

fn render(name: Option<&str>, logo: Option<&str>, accent: &str, support: Option<&str>) -> Rendered {
    let mut head_open = String::with_capacity(CSS.len() + 256);
    head_open.push_str("<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><meta name=\"viewport\" content=\"width=device-width,initial-scale=1\"><meta name=\"robots\" content=\"noindex\"><style>:root{--accent:");
    escape_into(accent, &mut head_open);
    head_open.push('}');
    head_open.push_str(CSS);
    head_open.push_str("</style>");
    let mut header = String::from("<header>");
    match (logo, name) {
        (Some(url), _) => {
            header.push_str("<img src=\"");
            escape_into(url, &mut header);
            header.push_str("\" alt=\"");
            escape_into(name.unwrap_or(""), &mut header);
            header.push_str("\">");
        }
        (None, Some(n)) => {
            header.push_str("<span class=\"name\">");
            escape_into(n, &mut header);
            header.push_str("</span>");
        }
        (None, None) => header.push_str("<div class=\"bar\"></div>"),
    }
    header.push_str("</header>");
    let mut foot = String::new();
    if let Some(url) = support {
        foot.push_str("<p class=\"meta\"><a href=\"");
        escape_into(url, &mut foot);
        foot.push_str("\" rel=\"noopener\">Get help</a></p>");
    }
    foot.push_str("</main></body></html>");
    Rendered { head_open, header, foot }
}

/// HTML-escapes `s` (text and attribute values) onto `out`.
pub fn escape_into(s: &str, out: &mut String) {
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::{AccentColor, HttpsUrl, SupportUrl};

    #[test]
    fn branded_page_never_names_the_platform() {
        let platform = PlatformBranding { name: "MIOSA".into(), ..Default::default() };
        let mut pages = Pages::new(&platform);
        let wb = WorkspaceBranding {
            logo_url: Some(HttpsUrl::try_from("https://cdn.example.com/l.png?a=1&b='x").unwrap()),
            accent_color: Some(AccentColor::try_from("#0a84ff").unwrap()),
            support_url: Some(SupportUrl::try_from("mailto:help@example.com").unwrap()),
        };
        let i = pages.add_workspace_branding(&wb);
        assert_eq!(pages.add_workspace_branding(&wb), i, "identical brandings are rendered once");
        for code in ErrorCode::ALL {
            let html = String::from_utf8(pages.html(i, code, Detail::default(), "rid-1").to_vec()).unwrap();
            assert!(!html.contains("MIOSA"), "{code:?} leaks the platform name");
            assert!(html.contains("#0a84ff"));
            assert!(html.contains("a=1&amp;b=&#39;x"), "attribute values are escaped");
            assert!(html.contains("mailto:help@example.com"));
            assert!(html.contains(code.as_str()));
            let neutral = String::from_utf8(pages.html(Pages::NEUTRAL, code, Detail::default(), "r").to_vec()).unwrap();
            assert!(!neutral.contains("MIOSA"));
        }
        let platform_page =
            String::from_utf8(pages.html(Pages::PLATFORM, ErrorCode::UnknownHost, Detail::default(), "r").to_vec()).unwrap();
        assert!(platform_page.contains("MIOSA"));
    }

    #[test]
    fn request_id_and_name_are_escaped() {
        let platform = PlatformBranding { name: "<b>Acme & Co</b>".into(), ..Default::default() };
        let pages = Pages::new(&platform);
        let html = String::from_utf8(pages.html(Pages::PLATFORM, ErrorCode::UnknownHost, Detail::default(), "<script>").to_vec()).unwrap();
        assert!(!html.contains("<script>") && !html.contains("<b>Acme"));
        assert!(html.contains("&lt;b&gt;Acme &amp; Co&lt;/b&gt;"));
    }

    #[test]
    fn refused_port_page_explains_binding() {
        let pages = Pages::new(&PlatformBranding::default());
        let html =
            String::from_utf8(pages.html(0, ErrorCode::SandboxUnavailable, Detail { port: Some(5173), deployment: false }, "r").to_vec())
                .unwrap();
        assert!(html.contains("nothing is listening on port <strong>5173</strong>"));
        assert!(html.contains("0.0.0.0") && html.contains("127.0.0.1"));
        let timeout = String::from_utf8(pages.html(0, ErrorCode::UpstreamTimeout, Detail::default(), "r").to_vec()).unwrap();
        assert!(timeout.contains("timed out"));
    }

    #[test]
    fn json_shape() {
        let v: serde_json::Value = serde_json::from_slice(&Pages::json(ErrorCode::PreviewNotFound)).unwrap();
        assert_eq!(v["error"]["status"], 404);
        assert_eq!(v["error"]["code"], "preview_not_found");
        assert!(v["error"]["message"].as_str().is_some_and(|m| !m.is_empty()));
        for code in ErrorCode::ALL {
            let text = String::from_utf8(Pages::json(code).to_vec()).unwrap();
            assert!(text.starts_with(&format!("{{\"error\":{{\"status\":{},\"code\":\"{}\"", code.status(), code.as_str())), "{text}");
            let v: serde_json::Value = serde_json::from_str(&text).unwrap();
            assert_eq!(v["error"]["message"], code.message());
        }
    }
}
