//! The `null-co` / `null-aio` protocol drivers: a device of a given size that
//! stores nothing. Writes succeed and are dropped; reads return zeroes with
//! `read-zeroes=on`, or leave the buffer untouched (QEMU's default, for
//! benchmarking the layers above without touching data). `latency-ns` delays
//! every request without blocking the queue thread.

use std::time::Duration;

use serde::Deserialize;

use crate::block::{boxed, BlockDriver, BlockResult, BlockStatus, Caps, IoFuture, IoVecs};
use crate::config::types::{Flag, Num, Size};

/// Options of `null-co` / `null-aio`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct NullOptions {
    /// Size in bytes (QEMU's default: 1 GiB).
    #[serde(default)]
    pub size: Option<Size>,
    /// Delay of every request, in nanoseconds.
    #[serde(default)]
    pub latency_ns: Option<Num>,
    /// Fill read buffers with zeroes.
    #[serde(default)]
    pub read_zeroes: Option<Flag>,
}

/// The `null-co` driver.
pub struct NullDriver {
    name: &'static str,
    size: u64,
    latency: Option<Duration>,
    read_zeroes: bool,
}

impl NullDriver {
    /// Creates the driver (`name` is `null-co` or `null-aio`).
    pub fn new(name: &'static str, opts: &NullOptions) -> Result<Self, String> {
        let size = opts.size.map_or(1 << 30, |s| s.0);
        if size > i64::MAX as u64 {
            return Err(format!("Parameter 'size' is too large: {size}"));
        }
        let latency = opts.latency_ns.map(|n| Duration::from_nanos(n.0)).filter(|d| !d.is_zero());
        Ok(NullDriver { name, size, latency, read_zeroes: opts.read_zeroes.is_some_and(|f| f.0) })
    }

    async fn delay(&self) {
        if let Some(d) = self.latency {
            crate::runtime::sleep(d).await;
        }
    }
}

impl BlockDriver for NullDriver {
    fn format_name(&self) -> &'static str {
        self.name
    }

    fn caps(&self) -> Caps {
        Caps { fua: true, discard: true, write_zeroes: true, block_status: true, truncate: false }
    }

    fn length(&self) -> u64 {
        self.size
    }

    fn read<'a>(&'a self, _offset: u64, buf: &'a IoVecs) -> IoFuture<'a, ()> {
        boxed(async move {
            self.delay().await;
            if self.read_zeroes {
                buf.zero();
            }
            Ok(())
        })
    }

    fn write<'a>(&'a self, _offset: u64, _buf: &'a IoVecs, _fua: bool) -> IoFuture<'a, ()> {
        boxed(async move {
            self.delay().await;
            Ok(())
        })
    }

    fn read_now(&self, _offset: u64, buf: &IoVecs) -> Option<BlockResult<()>> {
        if self.latency.is_some() {
            return None;
        }
        if self.read_zeroes {
            buf.zero();
        }
        Some(Ok(()))
    }

    fn write_now(&self, _offset: u64, _buf: &IoVecs) -> Option<BlockResult<()>> {
        self.latency.is_none().then_some(Ok(()))
    }

    fn flush(&self) -> IoFuture<'_, ()> {
        boxed(async move {
            self.delay().await;
            Ok(())
        })
    }

    fn discard(&self, _offset: u64, _len: u64) -> IoFuture<'_, ()> {
        boxed(async move {
            self.delay().await;
            Ok(())
        })
    }

    fn write_zeroes(&self, _offset: u64, _len: u64, _may_unmap: bool) -> IoFuture<'_, ()> {
        boxed(async move {
            self.delay().await;
            Ok(())
        })
    }

    fn block_status(&self, _offset: u64, len: u64) -> IoFuture<'_, BlockStatus> {
        // Like QEMU: with read-zeroes everything reads as zero; otherwise data.
        let zero = self.read_zeroes;
        boxed(async move { Ok(BlockStatus { allocated: true, zero, data: !zero, len }) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::{BlockNode, NodeOptions, WriteFlags};
    use std::time::Instant;

    fn node(json: &str) -> std::sync::Arc<BlockNode> {
        let o: NullOptions = serde_json::from_str(json).unwrap();
        BlockNode::new("n".into(), false, Box::new(NullDriver::new("null-co", &o).unwrap()), NodeOptions::default())
    }

    #[test]
    fn size_read_zeroes_and_latency() {
        let n = node(r#"{"size": "1M", "read-zeroes": "on", "latency-ns": "20000000"}"#);
        assert_eq!(n.length(), 1 << 20);
        let mut b = vec![0xffu8; 4096];
        let n2 = n.clone();
        let ptr = b.as_mut_ptr();
        let t = Instant::now();
        crate::runtime::block_on(async move {
            let mut v = IoVecs::new();
            // SAFETY: `b` outlives the request (block_on returns after it).
            unsafe { v.push_raw(ptr, 4096) };
            n2.read(0, &v).await.unwrap();
            n2.write(4096, &v, WriteFlags::default()).await.unwrap();
            assert!(n2.read(1 << 20, &v).await.is_err());
        })
        .unwrap();
        assert!(t.elapsed() >= Duration::from_millis(40));
        assert!(b.iter().all(|&x| x == 0));
        assert_eq!(n.stats().invalid_rd_operations, 1);
    }

    #[test]
    fn without_read_zeroes_the_buffer_is_untouched() {
        let n = node(r#"{"size": 4096}"#);
        let mut b = vec![0xffu8; 512];
        let ptr = b.as_mut_ptr();
        crate::runtime::block_on(async move {
            let mut v = IoVecs::new();
            // SAFETY: `b` outlives the request.
            unsafe { v.push_raw(ptr, 512) };
            n.read(0, &v).await.unwrap();
        })
        .unwrap();
        assert!(b.iter().all(|&x| x == 0xff));
        assert!(serde_json::from_str::<NullOptions>(r#"{"sise": 1}"#).is_err());
    }
}
