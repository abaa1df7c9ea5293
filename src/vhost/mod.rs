//! vhost-user-blk export: backend, virtio-blk request parsing, queue workers.
