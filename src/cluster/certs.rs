//! Certificates kept in Redis (fleet mode).
