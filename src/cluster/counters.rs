//! Counters shared by the fleet in Redis.
