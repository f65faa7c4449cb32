//! Helpers shared by the in-process benchmarks.

use std::time::Duration;

use edge::worker::wit;

/// Returns the CPU time this thread has used, which other processes on the
/// same core do not inflate as they do elapsed time.
pub fn thread_cpu_time() -> Duration {
    let mut time = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `time` is a valid, writable timespec.
    let result = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut time) };
    assert_eq!(result, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID) failed");
    Duration::new(time.tv_sec as u64, time.tv_nsec as u32)
}

/// Returns a `GET /` request of route `bench` from 127.0.0.1, with a `host`
/// and a `user-agent` header followed by `extra`.
pub fn request(extra: impl IntoIterator<Item = (String, String)>) -> wit::Request {
    let mut headers = vec![
        wit::Header {
            name: "host".to_owned(),
            value: "127.0.0.1:8080".to_owned(),
        },
        wit::Header {
            name: "user-agent".to_owned(),
            value: "bench".to_owned(),
        },
    ];
    for (name, value) in extra {
        headers.retain(|header| header.name != name);
        headers.push(wit::Header { name, value });
    }
    wit::Request {
        method: "GET".to_owned(),
        path: "/".to_owned(),
        query: None,
        headers,
        client_addr: "127.0.0.1".to_owned(),
        route: "bench".to_owned(),
        params: Vec::new(),
    }
}
