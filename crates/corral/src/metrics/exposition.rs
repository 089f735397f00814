//! Merging OpenMetrics expositions: corral's own figures and the text each
//! worker's application registry encoded, into the one exposition `/metrics`
//! serves, every application sample labelled with the `slot` that sent it.
//!
//! Written by hand because no crate merges expositions: the parser crates
//! model samples as numbers and would have to re-encode them, losing what
//! they do not model (exemplars, units, timestamps); here every sample line
//! is copied as the worker's encoder wrote it, with only `slot="N"` added.
//! The parsing is strict about what it relies on (family boundaries, sample
//! names, label syntax), so a worker that sends garbage loses its own series
//! for that scrape and never breaks the whole exposition.

use std::collections::{BTreeSet, HashMap};

/// One metric family: its metadata and its sample lines.
#[derive(Debug, Clone, PartialEq)]
struct Family<'a> {
    name: &'a str,
    help: Option<&'a str>,
    kind: &'a str,
    unit: Option<&'a str>,
    samples: Vec<Sample<'a>>,
}

/// A sample line, split where a label is inserted.
#[derive(Debug, Clone, PartialEq)]
struct Sample<'a> {
    name: &'a str,
    /// Between the braces, as written (`None`: no braces).
    labels: Option<&'a str>,
    /// The value and whatever follows it (timestamp, exemplar), space first.
    rest: &'a str,
}

/// The samples a family of `kind` may carry, by suffix of the family name
/// (the OpenMetrics rules).
fn suffixes(kind: &str) -> &'static [&'static str] {
    match kind {
        "counter" => &["_total", "_created"],
        "histogram" => &["_bucket", "_count", "_sum", "_created"],
        "gaugehistogram" => &["_bucket", "_gcount", "_gsum"],
        "summary" => &["", "_count", "_sum", "_created"],
        "info" => &["_info"],
        _ => &[""],
    }
}

const KINDS: [&str; 8] = [
    "counter",
    "gauge",
    "histogram",
    "gaugehistogram",
    "summary",
    "info",
    "stateset",
    "unknown",
];

fn belongs(family: &Family<'_>, sample: &str) -> bool {
    sample
        .strip_prefix(family.name)
        .is_some_and(|suffix| suffixes(family.kind).contains(&suffix))
}

fn is_metric_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn is_label_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Where a text could not be read, and why.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ParseError {
    pub line: usize,
    pub why: String,
}

impl std::fmt::Display for ParseError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "line {}: {}", self.line, self.why)
    }
}

/// Reads an exposition into its families, in order. Lines after `# EOF` are
/// ignored; a missing `# EOF` is accepted (the worker's text is a complete
/// registry encoding either way).
fn parse(text: &str) -> Result<Vec<Family<'_>>, ParseError> {
    let mut families: Vec<Family<'_>> = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let error = |why: String| ParseError {
            line: index + 1,
            why,
        };
        if line.is_empty() {
            continue;
        }
        if line == "# EOF" {
            break;
        }
        if let Some(comment) = line.strip_prefix("# ") {
            let (keyword, rest) = comment.split_once(' ').unwrap_or((comment, ""));
            let (name, value) = rest.split_once(' ').unwrap_or((rest, ""));
            if !matches!(keyword, "HELP" | "TYPE" | "UNIT") {
                return Err(error(format!("unknown comment {keyword:?}")));
            }
            if !is_metric_name(name) {
                return Err(error(format!("{name:?} is not a metric name")));
            }
            let same = families
                .last()
                .is_some_and(|family| family.name == name && family.samples.is_empty());
            if !same {
                if families.iter().any(|family| family.name == name) {
                    return Err(error(format!("family {name} appears twice")));
                }
                families.push(Family {
                    name,
                    help: None,
                    kind: "unknown",
                    unit: None,
                    samples: Vec::new(),
                });
            }
            let family = families.last_mut().expect("pushed above");
            match keyword {
                "HELP" => family.help = Some(value),
                "TYPE" => {
                    if !KINDS.contains(&value) {
                        return Err(error(format!("{value:?} is not a metric type")));
                    }
                    family.kind = value;
                }
                _ => family.unit = Some(value),
            }
            continue;
        }
        let sample = parse_sample(line).map_err(error)?;
        match families.last_mut() {
            Some(family) if belongs(family, sample.name) => family.samples.push(sample),
            _ => {
                return Err(error(format!(
                    "sample {} follows no family of its name",
                    sample.name
                )))
            }
        }
    }
    Ok(families)
}

fn parse_sample(line: &str) -> Result<Sample<'_>, String> {
    let end = line.find(['{', ' ']).unwrap_or(line.len());
    let name = &line[..end];
    if !is_metric_name(name) {
        return Err(format!("{name:?} is not a metric name"));
    }
    let (labels, rest) = if line[end..].starts_with('{') {
        let inside = &line[end + 1..];
        let close = label_set_end(inside)?;
        (Some(&inside[..close]), &inside[close + 1..])
    } else {
        (None, &line[end..])
    };
    check_value_and_after(rest.strip_prefix(' ').unwrap_or(""))
        .map_err(|why| format!("sample {name}: {why}"))?;
    Ok(Sample { name, labels, rest })
}

/// `value [timestamp] [# {labels} value [timestamp]]`: what is copied
/// unread must still be what a scraper accepts.
fn check_value_and_after(text: &str) -> Result<(), String> {
    let number = |token: Option<&str>, what: &str| match token {
        Some(token) if token.parse::<f64>().is_ok() => Ok(()),
        _ => Err(format!("no number for its {what}")),
    };
    let (sample, exemplar) = match text.split_once(" # ") {
        Some((sample, exemplar)) => (sample, Some(exemplar)),
        None => (text, None),
    };
    let mut tokens = sample.split(' ');
    number(tokens.next(), "value")?;
    if let Some(timestamp) = tokens.next() {
        number(Some(timestamp), "timestamp")?;
    }
    if tokens.next().is_some() {
        return Err("more after its value and timestamp".to_owned());
    }
    if let Some(exemplar) = exemplar {
        let labels = exemplar
            .strip_prefix('{')
            .ok_or("an exemplar without labels")?;
        let close = label_set_end(labels)?;
        let mut tokens = labels[close + 1..]
            .strip_prefix(' ')
            .ok_or("an exemplar without a value")?
            .split(' ');
        number(tokens.next(), "exemplar's value")?;
        if let Some(timestamp) = tokens.next() {
            number(Some(timestamp), "exemplar's timestamp")?;
        }
        if tokens.next().is_some() {
            return Err("more after its exemplar".to_owned());
        }
    }
    Ok(())
}

/// The index of the `}` that closes a label set (`text` starts after the
/// `{`), checking each `name="value"` on the way.
fn label_set_end(text: &str) -> Result<usize, String> {
    let bytes = text.as_bytes();
    let mut at = 0;
    let mut names = BTreeSet::new();
    if bytes.first() == Some(&b'}') {
        return Ok(0);
    }
    loop {
        let eq = text[at..]
            .find('=')
            .map(|offset| at + offset)
            .ok_or("a label has no value")?;
        let name = &text[at..eq];
        if !is_label_name(name) {
            return Err(format!("{name:?} is not a label name"));
        }
        if !names.insert(name) {
            return Err(format!("label {name} appears twice"));
        }
        if bytes.get(eq + 1) != Some(&b'"') {
            return Err(format!("label {name}'s value is not quoted"));
        }
        at = eq + 2;
        loop {
            match bytes.get(at) {
                None => return Err(format!("label {name}'s value never ends")),
                Some(b'\\') => at += 2,
                Some(b'"') => break,
                Some(_) => at += 1,
            }
        }
        at += 1;
        match bytes.get(at) {
            Some(b'}') => return Ok(at),
            Some(b',') => at += 1,
            _ => return Err("labels are not separated by commas".to_owned()),
        }
    }
}

fn has_label(labels: Option<&str>, wanted: &str) -> bool {
    // Label values were checked to be quoted, so a name is whatever follows
    // the opening brace or a comma outside quotes.
    let Some(labels) = labels else {
        return false;
    };
    let mut in_value = false;
    let mut escaped = false;
    let mut start = 0;
    for (index, byte) in labels.bytes().enumerate() {
        match (in_value, escaped, byte) {
            (true, true, _) => escaped = false,
            (true, false, b'\\') => escaped = true,
            (true, false, b'"') => in_value = false,
            (false, _, b'"') => in_value = true,
            (false, _, b'=') if &labels[start..index] == wanted => return true,
            (false, _, b',') => start = index + 1,
            _ => {}
        }
    }
    false
}

/// The merged exposition and what had to be left out of it.
#[derive(Debug, Default)]
pub(crate) struct Merged {
    pub text: String,
    /// One sentence each: which slot, which family, why.
    pub skipped: Vec<String>,
}

struct Entry<'a> {
    family: Family<'a>,
    /// `None`: corral's own; else the first slot that sent it.
    from: Option<usize>,
    lines: Vec<String>,
}

/// Merges corral's own exposition with each slot's application exposition.
///
/// A family appears once, with the metadata of its first source (corral's
/// own first, then slots in the given order) and the samples of every slot
/// that agrees on its type and unit. Skipped, each with a sentence in
/// [`Merged::skipped`]: a slot whose text does not parse (all of it), and
/// a slot's family that disagrees on type or unit with an earlier slot,
/// reuses a name of corral's own or a sample name of another family, or
/// already carries a `slot` label.
pub(crate) fn merge(own: &str, slots: &[(usize, &str)]) -> Merged {
    let mut merged = Merged::default();
    let mut entries: Vec<Entry<'_>> = Vec::new();
    let mut by_name: HashMap<&str, usize> = HashMap::new();
    // Which family each sample name belongs to, so two families can never
    // claim the same series name.
    let mut sample_names: HashMap<&str, usize> = HashMap::new();
    match parse(own) {
        Ok(families) => {
            for family in families {
                let index = entries.len();
                by_name.insert(family.name, index);
                for sample in &family.samples {
                    sample_names.insert(sample.name, index);
                }
                let lines = family.samples.iter().map(|s| render(s, None)).collect();
                entries.push(Entry {
                    family,
                    from: None,
                    lines,
                });
            }
        }
        Err(err) => merged
            .skipped
            .push(format!("corral's own metrics do not parse ({err})")),
    }
    for &(slot, text) in slots {
        let families = match parse(text) {
            Ok(families) => families,
            Err(err) => {
                merged.skipped.push(format!(
                    "slot {slot}'s metrics do not parse ({err}); its series are left out"
                ));
                continue;
            }
        };
        for family in families {
            let name = family.name;
            if let Some(sample) = family
                .samples
                .iter()
                .find(|sample| has_label(sample.labels, "slot"))
            {
                merged.skipped.push(format!(
                    "slot {slot}'s family {name} has its own slot label ({}); corral adds it, so the family is left out",
                    sample.name
                ));
                continue;
            }
            let index = match by_name.get(name) {
                Some(&index) => {
                    let entry = &entries[index];
                    let Some(first) = entry.from else {
                        merged.skipped.push(format!(
                            "slot {slot}'s family {name} has the name of one of corral's own metrics; rename it"
                        ));
                        continue;
                    };
                    if (entry.family.kind, entry.family.unit) != (family.kind, family.unit) {
                        merged.skipped.push(format!(
                            "slot {slot} declares {name} a {}{} but slot {first} a {}{}; slot {slot}'s samples are left out",
                            family.kind,
                            unit_note(family.unit),
                            entry.family.kind,
                            unit_note(entry.family.unit)
                        ));
                        continue;
                    }
                    index
                }
                None => entries.len(),
            };
            if let Some(other) = family.samples.iter().find_map(|sample| {
                sample_names
                    .get(sample.name)
                    .filter(|&&owner| owner != index)
                    .map(|&owner| (sample.name, entries[owner].family.name))
            }) {
                merged.skipped.push(format!(
                    "slot {slot}'s family {name} has a sample {} that family {} already names; the family is left out",
                    other.0, other.1
                ));
                continue;
            }
            for sample in &family.samples {
                sample_names.insert(sample.name, index);
            }
            let lines: Vec<String> = family
                .samples
                .iter()
                .map(|sample| render(sample, Some(slot)))
                .collect();
            if index == entries.len() {
                by_name.insert(name, index);
                entries.push(Entry {
                    family,
                    from: Some(slot),
                    lines,
                });
            } else {
                entries[index].lines.extend(lines);
            }
        }
    }
    let text = &mut merged.text;
    for entry in &entries {
        let family = &entry.family;
        if let Some(help) = family.help {
            text.push_str(&format!("# HELP {} {help}\n", family.name));
        }
        text.push_str(&format!("# TYPE {} {}\n", family.name, family.kind));
        if let Some(unit) = family.unit {
            text.push_str(&format!("# UNIT {} {unit}\n", family.name));
        }
        for line in &entry.lines {
            text.push_str(line);
            text.push('\n');
        }
    }
    text.push_str("# EOF\n");
    merged
}

fn unit_note(unit: Option<&str>) -> String {
    unit.map(|unit| format!(" in {unit}")).unwrap_or_default()
}

/// The sample line, with `slot="N"` first among its labels when given.
fn render(sample: &Sample<'_>, slot: Option<usize>) -> String {
    let labels = match (slot, sample.labels) {
        (None, None) => String::new(),
        (None, Some(labels)) => format!("{{{labels}}}"),
        (Some(slot), None | Some("")) => format!("{{slot=\"{slot}\"}}"),
        (Some(slot), Some(labels)) => format!("{{slot=\"{slot}\",{labels}}}"),
    };
    format!("{}{labels}{}", sample.name, sample.rest)
}

#[cfg(test)]
mod tests {
    use super::*;

    const OWN: &str = "# HELP corral_worker_requests Requests seen by the worker.\n\
        # TYPE corral_worker_requests counter\n\
        corral_worker_requests_total{slot=\"0\",pid=\"10\"} 5\n\
        # EOF\n";

    fn app(created: u64, seconds_sum: f64) -> String {
        format!(
            "# HELP payments_created Payments created.\n\
             # TYPE payments_created counter\n\
             payments_created_total{{currency=\"EUR\"}} {created}\n\
             # HELP verify_seconds Verify time.\n\
             # TYPE verify_seconds histogram\n\
             # UNIT verify_seconds seconds\n\
             verify_seconds_sum {seconds_sum}\n\
             verify_seconds_count 2\n\
             verify_seconds_bucket{{le=\"0.1\"}} 1\n\
             verify_seconds_bucket{{le=\"+Inf\"}} 2\n\
             # EOF\n"
        )
    }

    #[test]
    fn families_appear_once_with_every_slots_samples_labelled() {
        let (zero, one) = (app(3, 0.5), app(4, 0.25));
        let merged = merge(OWN, &[(0, &zero), (1, &one)]);
        assert!(merged.skipped.is_empty(), "{:?}", merged.skipped);
        let text = &merged.text;
        assert_eq!(text.matches("# TYPE payments_created counter").count(), 1);
        assert_eq!(text.matches("# TYPE verify_seconds histogram").count(), 1);
        assert_eq!(text.matches("# UNIT verify_seconds seconds").count(), 1);
        assert!(text.contains("payments_created_total{slot=\"0\",currency=\"EUR\"} 3\n"));
        assert!(text.contains("payments_created_total{slot=\"1\",currency=\"EUR\"} 4\n"));
        assert!(text.contains("verify_seconds_sum{slot=\"1\"} 0.25\n"));
        assert!(text.contains("verify_seconds_bucket{slot=\"0\",le=\"+Inf\"} 2\n"));
        // corral's own come first and untouched; one EOF, at the end.
        assert!(text.starts_with("# HELP corral_worker_requests"));
        assert!(text.contains("corral_worker_requests_total{slot=\"0\",pid=\"10\"} 5\n"));
        assert_eq!(text.matches("# EOF").count(), 1);
        assert!(text.ends_with("\n# EOF\n"));
        // Each family's samples stay together: slot 1's follow slot 0's.
        let at = |needle: &str| text.find(needle).unwrap();
        assert!(at("payments_created_total{slot=\"1\"") < at("# HELP verify_seconds"));
    }

    #[test]
    fn a_family_whose_type_disagrees_keeps_the_first_slots_and_says_so() {
        let zero = app(1, 0.1);
        let one = "# HELP payments_created Payments created.\n\
            # TYPE payments_created gauge\n\
            payments_created 7\n\
            # EOF\n";
        let merged = merge(OWN, &[(0, &zero), (1, one)]);
        assert_eq!(merged.skipped.len(), 1, "{:?}", merged.skipped);
        assert!(
            merged.skipped[0]
                .contains("slot 1 declares payments_created a gauge but slot 0 a counter"),
            "{:?}",
            merged.skipped
        );
        assert!(merged.text.contains("payments_created_total{slot=\"0\""));
        assert!(!merged.text.contains("payments_created 7"));
        assert!(!merged.text.contains("payments_created{slot=\"1\"}"));
    }

    #[test]
    fn a_unit_that_disagrees_is_a_conflict_too() {
        let zero = "# TYPE latency histogram\n# UNIT latency seconds\nlatency_count 1\n";
        let one = "# TYPE latency histogram\n# UNIT latency milliseconds\nlatency_count 1\n";
        let merged = merge("", &[(0, zero), (1, one)]);
        assert_eq!(merged.skipped.len(), 1, "{:?}", merged.skipped);
        assert_eq!(merged.text.matches("latency_count").count(), 1);
    }

    #[test]
    fn garbage_from_one_slot_leaves_out_that_slot_only() {
        let zero = app(2, 0.1);
        for garbage in [
            "payments_created_total{currency=\"EUR} 1\n",
            "# TYPE x counter\nx_total one\n",
            "# TYPE x counter\nx_total 1 2 3\n",
            "# TYPE x counter\nx_total 1 # 2\n",
            "# TYPE x counter\nx_total 1 # {a=\"b\"}\n",
            "# TYPE x counter\ny_total 1\n",
            "# TYPE x flubber\n",
            "# TYPE x counter\nx_total{currency=EUR} 1\n",
            "# TYPE x counter\nx_total{a=\"1\",a=\"2\"} 1\n",
            "# TYPE x counter\nx_total 1\n# TYPE y gauge\ny 1\n# TYPE x counter\n",
            "# SHOUT x\n",
            "\u{0}\u{1}",
        ] {
            let merged = merge(OWN, &[(0, &zero), (1, garbage)]);
            assert_eq!(merged.skipped.len(), 1, "{garbage:?}: {:?}", merged.skipped);
            assert!(merged.skipped[0].starts_with("slot 1's metrics do not parse"));
            assert!(merged.text.contains("payments_created_total{slot=\"0\""));
            assert!(!merged.text.contains("slot=\"1\""), "{garbage:?}");
        }
    }

    #[test]
    fn an_app_family_may_not_take_corrals_names_or_bring_a_slot_label() {
        let clash = "# TYPE corral_worker_requests counter\ncorral_worker_requests_total 1\n";
        let own_slot = "# TYPE jobs counter\njobs_total{slot=\"9\"} 1\n";
        let merged = merge(OWN, &[(0, clash), (1, own_slot)]);
        assert_eq!(merged.skipped.len(), 2, "{:?}", merged.skipped);
        assert!(merged.skipped[0].contains("corral's own"));
        assert!(merged.skipped[1].contains("its own slot label"));
        assert_eq!(
            merged.text.matches("corral_worker_requests_total").count(),
            1
        );
        assert!(!merged.text.contains("jobs_total"));
    }

    #[test]
    fn two_families_may_not_name_the_same_series() {
        let zero = "# TYPE jobs counter\njobs_total 1\n# TYPE jobs_total gauge\njobs_total 2\n";
        let merged = merge("", &[(0, zero)]);
        assert_eq!(merged.skipped.len(), 1, "{:?}", merged.skipped);
        assert!(merged.text.contains("jobs_total{slot=\"0\"} 1\n"));
        assert!(!merged.text.contains("} 2"));
    }

    #[test]
    fn escaped_label_values_exemplars_and_empty_label_sets_survive() {
        let zero = "# TYPE hits counter\n\
            hits_total{path=\"/a\\\"b,c=\\\\\"} 1 # {trace_id=\"x\"} 1.0\n\
            # TYPE seen counter\nseen_total 1 1700000000.5 # {trace_id=\"y\"} 2 1700000000\n\
            # TYPE up gauge\nup{} 1\n";
        let merged = merge("", &[(2, zero)]);
        assert!(merged.skipped.is_empty(), "{:?}", merged.skipped);
        assert!(merged
            .text
            .contains("hits_total{slot=\"2\",path=\"/a\\\"b,c=\\\\\"} 1 # {trace_id=\"x\"} 1.0\n"));
        assert!(merged.text.contains("up{slot=\"2\"} 1\n"));
        // A label named like `slot` inside a value is no slot label.
        let quoted = "# TYPE q counter\nq_total{path=\"slot=1\"} 1\n";
        assert!(merge("", &[(0, quoted)]).skipped.is_empty());
    }

    #[test]
    fn families_without_samples_keep_their_metadata() {
        let zero = "# HELP idle Nothing yet.\n# TYPE idle counter\n# EOF\n";
        let merged = merge("", &[(0, zero), (1, zero)]);
        assert_eq!(
            merged.text,
            "# HELP idle Nothing yet.\n# TYPE idle counter\n# EOF\n"
        );
    }

    #[test]
    fn random_text_never_panics_and_the_exposition_still_ends() {
        // Pieces that sit on the parser's edges: braces, quotes, escapes,
        // multi-byte characters right after a backslash, comment keywords.
        const PIECES: [&str; 18] = [
            "{", "}", "\"", "\\", "=", ",", " ", "\n", "# ", "TYPE ", "HELP ", "x", "x_total", "é",
            "1", "counter", "# EOF", "slot",
        ];
        let zero = app(1, 0.5);
        for _ in 0..20_000 {
            let length = rand::random_range(0..40);
            let text: String = (0..length)
                .map(|_| PIECES[rand::random_range(0..PIECES.len())])
                .collect();
            let merged = merge(OWN, &[(0, &zero), (1, &text)]);
            assert!(merged.text.ends_with("# EOF\n"), "{text:?}");
            assert!(parse(&merged.text).is_ok(), "{text:?}:\n{}", merged.text);
            // Whatever slot 1 sent, slot 0's series and corral's stay.
            assert!(merged.text.contains("payments_created_total{slot=\"0\""));
            assert!(merged.text.contains("corral_worker_requests_total{"));
        }
    }

    #[test]
    fn what_a_prometheus_client_registry_encodes_parses() {
        use prometheus_client::metrics::counter::Counter;
        use prometheus_client::metrics::family::Family as LabelledFamily;
        use prometheus_client::metrics::gauge::Gauge;
        use prometheus_client::metrics::histogram::Histogram;
        use prometheus_client::registry::{Registry, Unit};
        let mut registry = Registry::default();
        let requests = LabelledFamily::<Vec<(String, String)>, Counter>::default();
        registry.register("requests", "Requests \"served\"", requests.clone());
        requests
            .get_or_create(&vec![("path".into(), "/a\"\\\nb".into())])
            .inc();
        let gauge = Gauge::<i64>::default();
        gauge.set(-3);
        registry.register("queue", "Queued", gauge);
        let histogram = Histogram::new([0.1, 1.0]);
        histogram.observe(0.5);
        registry.register_with_unit("verify", "Verify", Unit::Seconds, histogram);
        registry.sub_registry_with_prefix("jobs").register(
            "done",
            "Done",
            Counter::<u64>::default(),
        );
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        let families = parse(&text).unwrap();
        let names: Vec<_> = families.iter().map(|f| (f.name, f.kind)).collect();
        assert_eq!(
            names,
            [
                ("requests", "counter"),
                ("queue", "gauge"),
                ("verify_seconds", "histogram"),
                ("jobs_done", "counter")
            ]
        );
        assert_eq!(families[2].samples.len(), 5, "sum, count, three buckets");
        let merged = merge("", &[(0, &text)]);
        assert!(merged.skipped.is_empty(), "{:?}", merged.skipped);
        assert!(
            merged.text.contains("queue{slot=\"0\"} -3\n"),
            "{}",
            merged.text
        );
    }
}
