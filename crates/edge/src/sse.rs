//! Server-sent events as bytes: where one event ends, for code that reads or rewrites
//! streams as they pass (the sidecar's resumed answers, the API server's usage meter).

use memchr::memmem;

/// The end of the first complete event in `buf` (after its blank line, `\n\n` or
/// `\r\n\r\n`), if it holds one.
pub fn event_end(buf: &[u8]) -> Option<usize> {
    let lf = memmem::find(buf, b"\n\n").map(|i| i + 2);
    let crlf = memmem::find(buf, b"\r\n\r\n").map(|i| i + 4);
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_end_at_the_first_blank_line_of_either_kind() {
        assert_eq!(event_end(b"data: a\n\ndata: b\n\n"), Some(9));
        assert_eq!(event_end(b"data: a\r\n\r\ndata: b\n\n"), Some(11));
        assert_eq!(event_end(b"data: a\ndata: b\n"), None);
        assert_eq!(event_end(b""), None);
    }
}
