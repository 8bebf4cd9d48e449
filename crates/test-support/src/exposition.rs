//! A small parser for the Prometheus text and OpenMetrics expositions.

use std::collections::BTreeMap;

#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

#[derive(Debug, Clone, Default)]
pub struct Exposition {
    /// Family name → type, from `# TYPE`.
    pub types: BTreeMap<String, String>,
    pub samples: Vec<Sample>,
}

impl Exposition {
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut out = Exposition::default();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let mut parts = rest.split_whitespace();
                let (Some(name), Some(kind)) = (parts.next(), parts.next()) else {
                    return Err(format!("line {}: bad TYPE: {line}", n + 1));
                };
                out.types.insert(name.to_string(), kind.to_string());
                continue;
            }
            if line.starts_with('#') {
                continue;
            }
            out.samples
                .push(parse_sample(line).map_err(|e| format!("line {}: {e}: {line}", n + 1))?);
        }
        Ok(out)
    }

    /// Samples named `name` whose labels include every pair in `labels`.
    pub fn find<'a>(
        &'a self,
        name: &'a str,
        labels: &'a [(&'a str, &'a str)],
    ) -> impl Iterator<Item = &'a Sample> + 'a {
        self.samples.iter().filter(move |s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
    }

    /// The value of the one sample matching, or `None`.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let mut it = self.find(name, labels);
        let first = it.next()?.value;
        assert!(
            it.next().is_none(),
            "more than one sample of {name} matches {labels:?}"
        );
        Some(first)
    }

    /// The family's type, accepting the OpenMetrics convention that counters are typed
    /// under the name without `_total`.
    pub fn type_of(&self, family: &str) -> Option<&str> {
        self.types
            .get(family)
            .or_else(|| self.types.get(family.trim_end_matches("_total")))
            .map(String::as_str)
    }
}

fn parse_sample(line: &str) -> Result<Sample, String> {
    let (name_end, mut labels) = match line.find(['{', ' ']) {
        Some(i) if line.as_bytes()[i] == b'{' => {
            let close = find_label_end(&line[i..]).ok_or("unterminated labels")? + i;
            (i, (Some((i + 1, close))))
        }
        Some(i) => (i, None),
        None => return Err("no value".into()),
    };
    let name = line[..name_end].to_string();
    let mut map = BTreeMap::new();
    let rest = if let Some((start, close)) = labels.take() {
        parse_labels(&line[start..close], &mut map)?;
        &line[close + 1..]
    } else {
        &line[name_end..]
    };
    let value_str = rest.split_whitespace().next().ok_or("no value")?;
    let value = match value_str {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse::<f64>().map_err(|e| format!("value {v:?}: {e}"))?,
    };
    Ok(Sample {
        name,
        labels: map,
        value,
    })
}

fn find_label_end(s: &str) -> Option<usize> {
    let mut in_str = false;
    let mut escaped = false;
    for (i, c) in s.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if in_str => escaped = true,
            '"' => in_str = !in_str,
            '}' if !in_str => return Some(i),
            _ => {}
        }
    }
    None
}

fn parse_labels(s: &str, out: &mut BTreeMap<String, String>) -> Result<(), String> {
    let mut rest = s.trim();
    while !rest.is_empty() {
        let eq = rest.find('=').ok_or("label without =")?;
        let key = rest[..eq].trim().to_string();
        rest = rest[eq + 1..].trim_start();
        let body = rest.strip_prefix('"').ok_or("label value not quoted")?;
        let mut value = String::new();
        let mut chars = body.char_indices();
        let mut end = None;
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, c)) => value.push(c),
                    None => return Err("dangling escape".into()),
                },
                '"' => {
                    end = Some(i);
                    break;
                }
                c => value.push(c),
            }
        }
        let end = end.ok_or("unterminated label value")?;
        out.insert(key, value);
        rest = body[end + 1..]
            .trim_start()
            .trim_start_matches(',')
            .trim_start();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_text_and_openmetrics() {
        let text = "# HELP a_total x\n# TYPE a counter\na_total{status=\"ok\",x=\"q\\\"}\"} 3\nb 1.5e3\nc_bucket{le=\"+Inf\"} 2 1700000000\n# EOF\n";
        let e = Exposition::parse(text).unwrap();
        assert_eq!(e.type_of("a_total"), Some("counter"));
        assert_eq!(e.value("a_total", &[("status", "ok")]), Some(3.0));
        assert_eq!(e.value("a_total", &[("x", "q\"}")]), Some(3.0));
        assert_eq!(e.value("b", &[]), Some(1500.0));
        assert_eq!(e.value("c_bucket", &[("le", "+Inf")]), Some(2.0));
        assert!(Exposition::parse("x{a=\"1\" 2").is_err());
    }
}
