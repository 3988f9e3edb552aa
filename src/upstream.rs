//! Upstream concerns beyond routing: waking suspended sandboxes (later: instance
//! selection and health checks).

pub mod wake;
