//! CPU affinity of the calling thread: which CPUs it may run on, and pinning
//! it to one (an export's `cpu-affinity`).

use std::io;

use crate::config::types::{CpuList, MAX_CPUS};

/// The CPUs the calling thread may run on now, ascending.
pub fn allowed_cpus() -> io::Result<CpuList> {
    // SAFETY: an all-zero cpu_set_t is a valid empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid cpu_set_t of the size passed; 0 is this thread.
    if unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: CPU_ISSET reads `set` for a CPU number below CPU_SETSIZE.
    Ok(CpuList((0..MAX_CPUS).filter(|&c| unsafe { libc::CPU_ISSET(c, &set) }).map(|c| c as u16).collect()))
}

/// Restricts the calling thread to `cpu`.
pub fn pin_current_thread(cpu: u16) -> io::Result<()> {
    if usize::from(cpu) >= MAX_CPUS {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    // SAFETY: an all-zero cpu_set_t is a valid empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: CPU_SET writes a CPU number below CPU_SETSIZE into `set`.
    unsafe { libc::CPU_SET(usize::from(cpu), &mut set) };
    // SAFETY: `set` is a valid cpu_set_t of the size passed; 0 is this thread.
    if unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Checks that every CPU of `cpus` is one this process may run on.
pub fn check_available(cpus: &[u16]) -> Result<(), String> {
    let allowed = allowed_cpus().map_err(|e| format!("cannot read this process's CPU affinity: {e}"))?;
    match cpus.iter().find(|c| !allowed.0.contains(c)) {
        Some(c) => Err(format!("CPU {c} is not one this process may run on ({allowed})")),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_pins_itself_and_others_keep_their_cpus() {
        let before = allowed_cpus().expect("affinity");
        assert!(!before.0.is_empty());
        let last = *before.0.last().expect("a CPU");
        let pinned = std::thread::spawn(move || {
            pin_current_thread(last).expect("pin");
            allowed_cpus().expect("affinity")
        })
        .join()
        .expect("thread");
        assert_eq!(pinned.0, vec![last]);
        assert_eq!(allowed_cpus().expect("affinity"), before, "only the pinned thread changed");
        assert!(check_available(&[last]).is_ok());
        let missing = (0..MAX_CPUS as u16).find(|c| !before.0.contains(c)).expect("fewer than 1024 CPUs");
        let err = check_available(&[last, missing]).expect_err("not available");
        assert!(err.starts_with(&format!("CPU {missing} is not one this process may run on")), "{err}");
        assert!(pin_current_thread(MAX_CPUS as u16).is_err());
    }
}
