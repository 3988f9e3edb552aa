//! What the edge has asked of its CA, persisted: per-name backoff, and the history its
//! rate-limit budget is computed from. Written before every order starts, so a crash
//! loop counts every attempt and cannot hammer the CA.
//!
//! Pure functions of `now` (Unix seconds); the manager persists after each change.

use crate::config::tls::Limits;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

const HOUR: i64 = 3_600;
const WEEK: i64 = 7 * 86_400;

/// One name's failures in a row and when it may be tried again.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Backoff {
    pub failures: u32,
    pub next_try: i64,
    pub last_error: Option<String>,
    pub last_attempt: Option<i64>,
    pub last_success: Option<i64>,
    /// When the name left the routing state (renewals stop; its certificate goes
    /// [`UNUSED_FOR`] later). Absent while the state names it.
    #[serde(default)]
    pub left_at: Option<i64>,
}

/// How long the certificate of a name that left the routing state is kept (CONTRACT §9).
pub const UNUSED_FOR: i64 = 30 * 86_400;

/// The persisted ledger.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Ledger {
    /// New orders (account-wide), times.
    #[serde(default)]
    pub orders: Vec<i64>,
    /// Certificates issued: time, registered domain, the exact set of names.
    #[serde(default)]
    pub issued: Vec<(i64, String, String)>,
    /// Failed validations: time, hostname.
    #[serde(default)]
    pub failed: Vec<(i64, String)>,
    /// Per managed name.
    #[serde(default)]
    pub names: BTreeMap<String, Backoff>,
}

/// Why an order has to wait for the budget, and until when.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Deferral {
    pub limit: &'static str,
    pub until: i64,
}

/// Remaining budget per limit (the tightest domain or host for per-name limits).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Budget {
    pub orders: i64,
    pub certs_per_domain: i64,
    pub failures_per_host: i64,
    pub duplicates: i64,
}

/// The registered domain `name` counts against: the label under a configured public
/// suffix, else the last two labels (the CA uses the Public Suffix List; an operator
/// lists the platform's own suffixes).
pub fn registered_domain(name: &str, public_suffixes: &[String]) -> String {
    let name = name.strip_prefix("*.").unwrap_or(name);
    let mut best: Option<&str> = None;
    for ps in public_suffixes {
        let under = name.len() > ps.len() + 1 && name.ends_with(ps.as_str()) && name.as_bytes()[name.len() - ps.len() - 1] == b'.';
        if under && best.is_none_or(|b| ps.len() > b.len()) {
            best = Some(ps);
        }
    }
    let cut = match best {
        Some(ps) => ps.split('.').count() + 1,
        None => 2,
    };
    let labels: Vec<&str> = name.split('.').collect();
    labels[labels.len().saturating_sub(cut)..].join(".")
}

impl Ledger {
    /// Reads the ledger; a missing or unreadable file is an empty ledger (logged).
    pub fn load(path: &Path) -> Ledger {
        match std::fs::read(path) {
            Ok(b) => serde_json::from_slice(&b).unwrap_or_else(|e| {
                tracing::error!(file = %path.display(), error = %e, "ACME ledger is corrupt; starting a new one");
                Ledger::default()
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ledger::default(),
            Err(e) => {
                tracing::error!(file = %path.display(), error = %e, "cannot read the ACME ledger; starting a new one");
                Ledger::default()
            }
        }
    }

    /// Writes atomically (temp file, fsync, rename).
    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        let bytes = serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?;
        crate::files::write_atomic(path, &bytes, 0o644)
    }

    /// Forgets history no limit looks at any more.
    /// Notes which managed names the routing state no longer has (`current` says which
    /// it has), and forgets those gone for [`UNUSED_FOR`]: their certificates are to be
    /// removed (returned). Returns also whether anything changed.
    pub fn leftovers(&mut self, current: impl Fn(&str) -> bool, now: i64) -> (Vec<String>, bool) {
        let mut changed = false;
        let mut expired = Vec::new();
        for (name, b) in self.names.iter_mut() {
            if current(name) {
                changed |= b.left_at.take().is_some();
            } else {
                let left = *b.left_at.get_or_insert_with(|| {
                    changed = true;
                    now
                });
                if now - left >= UNUSED_FOR {
                    expired.push(name.clone());
                }
            }
        }
        for name in &expired {
            self.names.remove(name);
            changed = true;
        }
        (expired, changed)
    }

    pub fn prune(&mut self, now: i64) {
        self.orders.retain(|t| *t > now - 3 * HOUR);
        self.issued.retain(|(t, _, _)| *t > now - WEEK);
        self.failed.retain(|(t, _)| *t > now - HOUR);
    }

    /// Whether an order for `name` fits the budget now; `renewal` orders are exempt from
    /// the per-domain limit, as at Let's Encrypt.
    pub fn check(&self, name: &str, registered: &str, renewal: bool, limits: &Limits, now: i64) -> Result<(), Deferral> {
        let oldest_in = |times: &mut dyn Iterator<Item = i64>, window: i64, limit: u32| -> Option<i64> {
            // (limits are validated to be at least 1; a 0 here would mean "no slot")
            let limit = limit.max(1) as usize;
            let mut v: Vec<i64> = times.filter(|t| *t > now - window).collect();
            if v.len() < limit {
                return None;
            }
            v.sort_unstable();
            // the wait until enough of them age out of the window
            Some(v[v.len() - limit] + window)
        };
        if let Some(until) = oldest_in(&mut self.orders.iter().copied(), 3 * HOUR, limits.orders_per_3h) {
            return Err(Deferral { limit: "orders_per_3h", until });
        }
        if let Some(until) =
            oldest_in(&mut self.failed.iter().filter(|(_, h)| h == name).map(|(t, _)| *t), HOUR, limits.failures_per_host_per_hour)
        {
            return Err(Deferral { limit: "failures_per_host_per_hour", until });
        }
        if let Some(until) =
            oldest_in(&mut self.issued.iter().filter(|(_, _, n)| n == name).map(|(t, _, _)| *t), WEEK, limits.duplicates_per_week)
        {
            return Err(Deferral { limit: "duplicates_per_week", until });
        }
        if !renewal {
            if let Some(until) = oldest_in(
                &mut self.issued.iter().filter(|(_, d, _)| d == registered).map(|(t, _, _)| *t),
                WEEK,
                limits.certs_per_domain_per_week,
            ) {
                return Err(Deferral { limit: "certs_per_domain_per_week", until });
            }
        }
        Ok(())
    }

    /// An order is about to be placed.
    pub fn started(&mut self, name: &str, now: i64) {
        self.orders.push(now);
        self.names.entry(name.to_owned()).or_default().last_attempt = Some(now);
    }

    /// The order produced a certificate.
    pub fn succeeded(&mut self, name: &str, registered: &str, now: i64) {
        self.issued.push((now, registered.to_owned(), name.to_owned()));
        let b = self.names.entry(name.to_owned()).or_default();
        b.failures = 0;
        b.next_try = 0;
        b.last_error = None;
        b.last_success = Some(now);
    }

    /// The order failed; `validation` when the CA refused a challenge (counts toward the
    /// failed-validation limit). Returns when the name may be tried again.
    pub fn failed(&mut self, name: &str, error: &str, validation: bool, min: i64, max: i64, now: i64) -> i64 {
        if validation {
            self.failed.push((now, name.to_owned()));
        }
        let b = self.names.entry(name.to_owned()).or_default();
        b.failures = b.failures.saturating_add(1);
        let wait = min.saturating_mul(1i64 << (b.failures - 1).min(30)).min(max);
        b.next_try = now + wait;
        b.last_error = Some(error.chars().take(1000).collect());
        b.next_try
    }

    /// When `name` may next be ordered (0 = now).
    pub fn next_try(&self, name: &str) -> i64 {
        self.names.get(name).map(|b| b.next_try).unwrap_or(0)
    }

    /// What is left of each limit.
    pub fn budget(&self, limits: &Limits, now: i64) -> Budget {
        let orders = self.orders.iter().filter(|t| **t > now - 3 * HOUR).count() as i64;
        let mut per_domain: BTreeMap<&str, i64> = BTreeMap::new();
        let mut per_set: BTreeMap<&str, i64> = BTreeMap::new();
        for (t, d, n) in &self.issued {
            if *t > now - WEEK {
                *per_domain.entry(d).or_default() += 1;
                *per_set.entry(n).or_default() += 1;
            }
        }
        let mut per_host: BTreeMap<&str, i64> = BTreeMap::new();
        for (t, h) in &self.failed {
            if *t > now - HOUR {
                *per_host.entry(h).or_default() += 1;
            }
        }
        let max = |m: &BTreeMap<&str, i64>| m.values().copied().max().unwrap_or(0);
        Budget {
            orders: limits.orders_per_3h as i64 - orders,
            certs_per_domain: limits.certs_per_domain_per_week as i64 - max(&per_domain),
            failures_per_host: limits.failures_per_host_per_hour as i64 - max(&per_host),
            duplicates: limits.duplicates_per_week as i64 - max(&per_set),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registered_domains() {
        assert_eq!(registered_domain("*.sandbox.miosa.app", &[]), "miosa.app");
        assert_eq!(registered_domain("*.ws.miosa.app", &["miosa.app".into()]), "ws.miosa.app");
        assert_eq!(registered_domain("a.b.ws.miosa.app", &["miosa.app".into()]), "ws.miosa.app");
        assert_eq!(registered_domain("app.customer.com", &["miosa.app".into()]), "customer.com");
        assert_eq!(registered_domain("com", &[]), "com");
    }

    #[test]
    fn backoff_doubles_up_to_the_maximum_and_resets_on_success() {
        let mut l = Ledger::default();
        assert_eq!(l.failed("a.test", "boom", true, 60, 300, 1000), 1060);
        assert_eq!(l.failed("a.test", "boom", true, 60, 300, 1000), 1120);
        assert_eq!(l.failed("a.test", "boom", true, 60, 300, 1000), 1240);
        assert_eq!(l.failed("a.test", "boom", true, 60, 300, 1000), 1300);
        assert_eq!(l.next_try("a.test"), 1300);
        assert_eq!(l.names["a.test"].last_error.as_deref(), Some("boom"));
        l.succeeded("a.test", "a.test", 2000);
        assert_eq!(l.next_try("a.test"), 0);
        assert_eq!(l.names["a.test"].failures, 0);
    }

    #[test]
    fn budget_defers_until_the_window_frees_a_slot() {
        let limits = Limits { certs_per_domain_per_week: 2, orders_per_3h: 3, failures_per_host_per_hour: 2, duplicates_per_week: 1 };
        let mut l = Ledger::default();
        let now = 1_000_000;
        assert!(l.check("a.x.test", "x.test", false, &limits, now).is_ok());
        // failed validations per host
        l.failed("a.x.test", "e", true, 1, 1, now - 100);
        l.failed("a.x.test", "e", true, 1, 1, now - 50);
        assert_eq!(
            l.check("a.x.test", "x.test", false, &limits, now),
            Err(Deferral { limit: "failures_per_host_per_hour", until: now - 100 + HOUR })
        );
        assert!(l.check("b.x.test", "x.test", false, &limits, now).is_ok());
        // duplicates
        l.succeeded("b.x.test", "x.test", now - 10);
        assert_eq!(l.check("b.x.test", "x.test", true, &limits, now).unwrap_err().limit, "duplicates_per_week");
        // per registered domain; renewals exempt
        l.succeeded("c.x.test", "x.test", now - 5);
        assert_eq!(l.check("d.x.test", "x.test", false, &limits, now).unwrap_err().limit, "certs_per_domain_per_week");
        assert!(l.check("d.x.test", "x.test", true, &limits, now).is_ok());
        assert!(l.check("d.y.test", "y.test", false, &limits, now).is_ok());
        // orders per account, whatever the name
        for t in 0..3 {
            l.started("e.z.test", now - 10 + t);
        }
        assert_eq!(
            l.check("f.w.test", "w.test", false, &limits, now),
            Err(Deferral { limit: "orders_per_3h", until: now - 10 + 3 * HOUR })
        );
        let b = l.budget(&limits, now);
        assert_eq!(b, Budget { orders: 0, certs_per_domain: 0, failures_per_host: 0, duplicates: 0 });
        // three hours later the orders have aged out
        l.prune(now + 3 * HOUR + 1);
        assert_eq!(l.budget(&limits, now + 3 * HOUR + 1).orders, 3);
    }

    #[test]
    fn survives_a_round_trip_and_a_corrupt_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("ledger.json");
        let mut l = Ledger::default();
        l.started("a.test", 5);
        l.failed("a.test", "x", false, 60, 120, 6);
        l.save(&p).unwrap();
        assert_eq!(Ledger::load(&p), l);
        std::fs::write(&p, b"{not json").unwrap();
        assert_eq!(Ledger::load(&p), Ledger::default());
    }

    #[test]
    fn names_that_leave_the_state_are_forgotten_after_thirty_days_unless_they_return() {
        let mut l = Ledger::default();
        l.succeeded("a.test", "a.test", 0);
        l.succeeded("b.test", "b.test", 0);
        let day = 86_400;
        // b.test leaves the state on day 1.
        let (gone, changed) = l.leftovers(|n| n == "a.test", day);
        assert!(gone.is_empty() && changed);
        assert_eq!(l.names["b.test"].left_at, Some(day));
        // Nothing changes while it stays away less than 30 days…
        assert_eq!(l.leftovers(|n| n == "a.test", 30 * day), (Vec::new(), false));
        // …it comes back: the clock starts again when it leaves again.
        assert_eq!(l.leftovers(|_| true, 20 * day), (Vec::new(), true));
        assert_eq!(l.names["b.test"].left_at, None);
        l.leftovers(|n| n == "a.test", 40 * day);
        assert_eq!(l.leftovers(|n| n == "a.test", 69 * day), (Vec::new(), false));
        assert_eq!(l.leftovers(|n| n == "a.test", 70 * day), (vec!["b.test".to_string()], true));
        assert!(!l.names.contains_key("b.test") && l.names.contains_key("a.test"));
        // A ledger written before `left_at` existed still reads.
        let old = r#"{"names":{"c.test":{"failures":0,"next_try":0,"last_error":null,"last_attempt":null,"last_success":5}}}"#;
        let l: Ledger = serde_json::from_str(old).unwrap();
        assert_eq!(l.names["c.test"].left_at, None);
    }
}
