//! COLO block replication (primary/secondary, checkpoint, failover).
//!
//! Nothing lives here yet: the replication filter stands on the block layer
//! core (children with roles, requests that wait) and arrives with its issue.
