//! Just enough of `multipart/form-data` (RFC 7578) to route a request by one of its
//! fields: OpenAI's audio endpoints send `model` beside the file. Nothing is copied: the
//! answer is where the field's value lies in the body, so that it can be read or
//! replaced and every other byte forwarded as it came.

use std::ops::Range;

use memchr::memmem;

/// Why a multipart body could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MultipartError {
    #[error("the content type has no multipart boundary")]
    NoBoundary,
    #[error("the body is not multipart/form-data with its boundary")]
    Malformed,
    #[error("the form has more than one `{0}` field")]
    Duplicate(String),
}

/// The boundary of a `multipart/form-data` content type, `None` for any other type.
pub fn boundary(content_type: &str) -> Option<Result<&str, MultipartError>> {
    let mut params = content_type.split(';');
    let mime = params.next()?.trim();
    if !mime.eq_ignore_ascii_case("multipart/form-data") {
        return None;
    }
    let found = params.find_map(|p| {
        let (k, v) = p.split_once('=')?;
        k.trim()
            .eq_ignore_ascii_case("boundary")
            .then(|| v.trim().trim_matches('"'))
    });
    // RFC 2046: 1 to 70 characters.
    Some(match found {
        Some(b) if !b.is_empty() && b.len() <= 70 => Ok(b),
        _ => Err(MultipartError::NoBoundary),
    })
}

/// Where the value of the form field `name` lies in `body`: `None` when the form has no
/// such field, an error when the body is not a form with `boundary` or has the field
/// twice (an engine must not be shown another value than the one we routed by).
pub fn field(
    body: &[u8],
    boundary: &str,
    name: &str,
) -> Result<Option<Range<usize>>, MultipartError> {
    Ok(part(body, boundary, name)?.map(|p| p.value))
}

/// A form field found in a body: where its value lies, and the file name its part
/// carries (an uploaded file's).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Part {
    pub value: Range<usize>,
    pub filename: Option<String>,
}

/// [`field`], with the part's file name.
pub fn part(body: &[u8], boundary: &str, name: &str) -> Result<Option<Part>, MultipartError> {
    let open = format!("--{boundary}");
    let delimiter = format!("\r\n--{boundary}");
    let finder = memmem::Finder::new(delimiter.as_bytes());
    // The first delimiter may come without its CRLF, at the very start.
    let mut at = if body.starts_with(open.as_bytes()) {
        open.len()
    } else {
        finder.find(body).ok_or(MultipartError::Malformed)? + delimiter.len()
    };
    let mut found = None;
    loop {
        let rest = &body[at..];
        if rest.starts_with(b"--") {
            return Ok(found);
        }
        // Transport padding, then the CRLF that ends the delimiter line.
        let line_end = memmem::find(rest, b"\r\n").ok_or(MultipartError::Malformed)?;
        if rest[..line_end].iter().any(|b| *b != b' ' && *b != b'\t') {
            return Err(MultipartError::Malformed);
        }
        let head_start = at + line_end + 2;
        // A part without headers ends them at once.
        let (headers, content_start) = if body[head_start..].starts_with(b"\r\n") {
            (&body[head_start..head_start], head_start + 2)
        } else {
            let head_len =
                memmem::find(&body[head_start..], b"\r\n\r\n").ok_or(MultipartError::Malformed)?;
            (
                &body[head_start..head_start + head_len],
                head_start + head_len + 4,
            )
        };
        let content_len = finder
            .find(&body[content_start..])
            .ok_or(MultipartError::Malformed)?;
        if disposition(headers, "name").as_deref() == Some(name) {
            if found.is_some() {
                return Err(MultipartError::Duplicate(name.to_string()));
            }
            found = Some(Part {
                value: content_start..content_start + content_len,
                filename: disposition(headers, "filename"),
            });
        }
        at = content_start + content_len + delimiter.len();
    }
}

/// The parameter `param` (`name`, `filename`) of a part's `Content-Disposition:
/// form-data; name="…"; filename="…"`.
fn disposition(headers: &[u8], param: &str) -> Option<String> {
    let headers = std::str::from_utf8(headers).ok()?;
    headers.split("\r\n").find_map(|line| {
        let (key, value) = line.split_once(':')?;
        if !key.trim().eq_ignore_ascii_case("content-disposition") {
            return None;
        }
        let mut params = value.split(';');
        if !params.next()?.trim().eq_ignore_ascii_case("form-data") {
            return None;
        }
        params.find_map(|p| {
            let (k, v) = p.split_once('=')?;
            k.trim()
                .eq_ignore_ascii_case(param)
                .then(|| v.trim().trim_matches('"').to_string())
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const B: &str = "----gt7MA4YWxk";

    fn form(parts: &[(&str, &[u8])]) -> Vec<u8> {
        let mut out = Vec::new();
        for (name, value) in parts {
            out.extend_from_slice(
                format!("--{B}\r\nContent-Disposition: form-data; name=\"{name}\"").as_bytes(),
            );
            if *name == "file" {
                out.extend_from_slice(b"; filename=\"a.wav\"\r\nContent-Type: audio/wav");
            }
            out.extend_from_slice(b"\r\n\r\n");
            out.extend_from_slice(value);
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(format!("--{B}--\r\n").as_bytes());
        out
    }

    #[test]
    fn a_part_carries_its_file_name() {
        let body = form(&[("purpose", b"batch"), ("file", b"{\"a\": 1}\n")]);
        let file = part(&body, B, "file").unwrap().unwrap();
        assert_eq!(&body[file.value], b"{\"a\": 1}\n");
        assert_eq!(file.filename.as_deref(), Some("a.wav"));
        let purpose = part(&body, B, "purpose").unwrap().unwrap();
        assert_eq!(
            (&body[purpose.value], purpose.filename),
            (&b"batch"[..], None)
        );
        assert_eq!(part(&body, B, "model").unwrap(), None);
    }

    #[test]
    fn the_boundary_is_read_from_form_data_only() {
        assert_eq!(
            boundary(&format!("multipart/form-data; boundary={B}")),
            Some(Ok(B))
        );
        assert_eq!(
            boundary("Multipart/Form-Data; charset=utf-8; boundary=\"a b\""),
            Some(Ok("a b"))
        );
        assert_eq!(boundary("application/json"), None);
        assert_eq!(
            boundary("multipart/form-data"),
            Some(Err(MultipartError::NoBoundary))
        );
        assert_eq!(
            boundary(&format!("multipart/form-data; boundary={}", "x".repeat(71))),
            Some(Err(MultipartError::NoBoundary))
        );
    }

    #[test]
    fn a_field_is_found_before_or_after_a_file_whatever_the_file_holds() {
        // The file holds what looks like a part header and a CRLF-less boundary.
        let audio: &[u8] = b"RIFF\x00\x01name=\"model\"\r\n\r\nnot-this --gt\r\n";
        for body in [
            form(&[("model", b"whisper-1"), ("file", audio)]),
            form(&[
                ("file", audio),
                ("language", b"en"),
                ("model", b"whisper-1"),
            ]),
        ] {
            let r = field(&body, B, "model").unwrap().unwrap();
            assert_eq!(&body[r], b"whisper-1");
            assert_eq!(&body[field(&body, B, "file").unwrap().unwrap()], audio);
        }
        let body = form(&[("file", audio)]);
        assert_eq!(field(&body, B, "model").unwrap(), None);
        // An empty value is a value.
        let body = form(&[("model", b"")]);
        assert_eq!(
            field(&body, B, "model").unwrap(),
            Some(body.len() - B.len() - 8..body.len() - B.len() - 8)
        );
    }

    #[test]
    fn broken_and_ambiguous_forms_are_errors() {
        let two = form(&[("model", b"a"), ("model", b"b")]);
        assert_eq!(
            field(&two, B, "model"),
            Err(MultipartError::Duplicate("model".into()))
        );
        let whole = form(&[("model", b"a"), ("file", b"xyz")]);
        // Cut anywhere before the closing delimiter: never a panic, never a value past the cut.
        for cut in 0..whole.len() - 4 {
            match field(&whole[..cut], B, "model") {
                Err(_) => {}
                Ok(r) => panic!("a body cut at {cut} read as {r:?}"),
            }
        }
        assert_eq!(
            field(b"{\"model\":\"a\"}", B, "model"),
            Err(MultipartError::Malformed)
        );
        // The wrong boundary finds nothing to read.
        assert_eq!(
            field(&whole, "other", "model"),
            Err(MultipartError::Malformed)
        );
    }
}
