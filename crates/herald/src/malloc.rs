//! One glibc malloc arena for the server process.
//!
//! glibc gives threads arenas of their own (up to eight per core): a
//! connection's short-lived allocations (its request head, routing) and its
//! long-lived ones (its task, mailbox) then spread over several heaps, whose
//! freed holes the other threads cannot reuse. For a push server, whose memory
//! is mostly many small long-lived connection states, that is waste:
//! `herald bench idle --transport sse --connections 10000` measured 2.42 to
//! 2.80 KB per connection with glibc's default and 2.09 to 2.14 with one
//! arena; burst fan-out CPU per delivery and acknowledged publishes per second
//! stayed within their run-to-run noise (small allocations are still served
//! from each thread's cache without the arena's lock). `MALLOC_ARENA_MAX` in
//! the environment, if set, wins.

/// Sets the arena limit; call before any thread starts.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
pub(crate) fn one_arena() {
    if std::env::var_os("MALLOC_ARENA_MAX").is_some() {
        return;
    }
    /// `M_ARENA_MAX` in glibc's malloc.h.
    const M_ARENA_MAX: i32 = -8;
    unsafe extern "C" {
        fn mallopt(param: i32, value: i32) -> i32;
    }
    // SAFETY: `mallopt` only changes an allocator tunable, takes plain
    // integers, and is called from `main` before the runtime starts threads.
    unsafe {
        mallopt(M_ARENA_MAX, 1);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub(crate) fn one_arena() {}
