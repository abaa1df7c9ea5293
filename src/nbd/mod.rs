//! NBD server export (fixed newstyle handshake, structured replies).
