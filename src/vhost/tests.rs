//! Unit tests of the vhost-user-blk export.
