//! Limits on the shape of a batch: items per batch, string lengths, keys per map and JSON
//! nesting depth. Each violation is a `400` that names the field's JSON path.

use crate::batch::{Batch, BatchError, BatchErrorKind, StringMap};

/// Default maximum number of impressions, and of events, in one batch.
pub const DEFAULT_MAX_BATCH_ITEMS: usize = 1000;
/// Default maximum length of any string in a batch, key or value, in bytes.
pub const DEFAULT_MAX_STRING_BYTES: usize = 8 * 1024;
/// Default maximum number of keys in one `args`, `outputs` or `fields` object.
pub const DEFAULT_MAX_MAP_KEYS: usize = 100;
/// Default maximum nesting of arrays and objects in a body; the batch itself uses 4 levels.
pub const DEFAULT_MAX_JSON_DEPTH: usize = 20;
/// Nesting of the batch's own structure: body, `impressions`, an item and its `args`.
pub const BATCH_DEPTH: usize = 4;

/// The limits a batch must keep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchLimits {
    pub max_items: usize,
    pub max_string_bytes: usize,
    pub max_map_keys: usize,
    pub max_json_depth: usize,
}

impl Default for BatchLimits {
    fn default() -> Self {
        Self {
            max_items: DEFAULT_MAX_BATCH_ITEMS,
            max_string_bytes: DEFAULT_MAX_STRING_BYTES,
            max_map_keys: DEFAULT_MAX_MAP_KEYS,
            max_json_depth: DEFAULT_MAX_JSON_DEPTH,
        }
    }
}

/// One step of a JSON path during the depth scan.
enum Step {
    Key(String),
    Index(usize),
}

/// Checks the nesting depth of `body` before it is parsed, so a deep body costs one scan.
///
/// The scan follows the JSON structure only as far as depth and path need. A body that is not
/// valid JSON passes here and is rejected by the parser.
pub fn check_depth(body: &[u8], max_depth: usize) -> Result<(), BatchError> {
    if !deeper_than(body, max_depth) {
        return Ok(());
    }
    // Only a body that is too deep pays for tracking the path that names the field.
    name_too_deep(body, max_depth)
}

/// Returns whether arrays and objects in `body` nest deeper than `max_depth`. String contents
/// are skipped with `memchr`, which is most of a batch's bytes.
fn deeper_than(body: &[u8], max_depth: usize) -> bool {
    let mut depth = 0usize;
    let mut at = 0;
    while let Some(&byte) = body.get(at) {
        match byte {
            b'"' => loop {
                // Jump to the closing quote, past escaped characters.
                let Some(found) = body
                    .get(at + 1..)
                    .and_then(|rest| memchr::memchr2(b'"', b'\\', rest))
                else {
                    // An unterminated string: the parser rejects the body.
                    return false;
                };
                at += 1 + found;
                if body[at] == b'"' {
                    break;
                }
                // Skip the backslash, and the loop then steps over the escaped character.
                at += 1;
            },
            b'{' | b'[' => {
                depth += 1;
                if depth > max_depth {
                    return true;
                }
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
        at += 1;
    }
    false
}

/// Scans a body that nests too deep and returns the error naming where it does.
fn name_too_deep(body: &[u8], max_depth: usize) -> Result<(), BatchError> {
    let mut path: Vec<Step> = Vec::new();
    let mut in_string = false;
    let mut escaped = false;
    let mut string_start = 0;
    let mut last_string: Option<(usize, usize)> = None;

    for (at, &byte) in body.iter().enumerate() {
        if in_string {
            match (escaped, byte) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => {
                    in_string = false;
                    last_string = Some((string_start, at));
                }
                _ => {}
            }
            continue;
        }
        match byte {
            b'"' => {
                in_string = true;
                string_start = at + 1;
            }
            b':' => {
                // The string just read was a key: it names the next value.
                if let (Some(Step::Key(key)), Some((start, end))) = (path.last_mut(), last_string) {
                    *key = String::from_utf8_lossy(&body[start..end]).into_owned();
                }
            }
            b',' => {
                if let Some(Step::Index(index)) = path.last_mut() {
                    *index += 1;
                }
            }
            b'{' | b'[' => {
                if path.len() >= max_depth {
                    return Err(BatchError {
                        kind: BatchErrorKind::InvalidField,
                        field: render_path(&path),
                        message: format!(
                            "nested deeper than {max_depth} levels of arrays and objects"
                        ),
                    });
                }
                path.push(if byte == b'{' {
                    Step::Key(String::new())
                } else {
                    Step::Index(0)
                });
            }
            b'}' | b']' => {
                path.pop();
            }
            _ => {}
        }
    }
    Ok(())
}

fn render_path(path: &[Step]) -> String {
    let mut rendered = String::new();
    for step in path {
        match step {
            Step::Key(key) if key.is_empty() => {}
            Step::Key(key) => {
                if !rendered.is_empty() {
                    rendered.push('.');
                }
                rendered.push_str(key);
            }
            Step::Index(index) => rendered.push_str(&format!("[{index}]")),
        }
    }
    if rendered.is_empty() {
        crate::batch::ROOT_FIELD.to_owned()
    } else {
        rendered
    }
}

/// Returns whether any map value of `batch` may have been a JSON object or array. A string that
/// starts with a bracket also counts, which costs only a depth scan.
pub fn has_nested_values(batch: &Batch<'_>) -> bool {
    let nested = |map: &StringMap<'_>| map.0.iter().any(|(_, value)| value.starts_with(['{', '[']));
    nested(&batch.args)
        || batch
            .impressions
            .iter()
            .any(|item| nested(&item.args) || nested(&item.outputs))
        || batch.events.iter().any(|item| nested(&item.fields))
}

/// Checks item count, string lengths and map sizes of a parsed batch.
pub fn check_batch(batch: &Batch<'_>, limits: &BatchLimits) -> Result<(), BatchError> {
    for (field, items) in [
        ("impressions", batch.impressions.len()),
        ("events", batch.events.len()),
    ] {
        if items > limits.max_items {
            return Err(invalid(
                field.to_owned(),
                format!(
                    "{items} items in one batch, at most {} allowed",
                    limits.max_items
                ),
            ));
        }
    }

    let check = Checker { limits };
    check.text(Some(&batch.device_id), || "deviceId".to_owned())?;
    check.text(batch.session_key.as_deref(), || "sessionKey".to_owned())?;
    let context = &batch.context;
    check.text(context.entry_url.as_deref(), || {
        "context.entryUrl".to_owned()
    })?;
    check.text(context.referrer.as_deref(), || {
        "context.referrer".to_owned()
    })?;
    check.text(context.user_agent.as_deref(), || {
        "context.userAgent".to_owned()
    })?;
    check.text(context.client_type.as_deref(), || {
        "context.clientType".to_owned()
    })?;
    check.map(&batch.args, || "args".to_owned())?;

    for (index, item) in batch.impressions.iter().enumerate() {
        let at = |field: &str| format!("impressions[{index}].{field}");
        check.text(Some(&item.impression_id), || at("impressionId"))?;
        check.text(Some(&item.feature), || at("feature"))?;
        check.map(&item.args, || at("args"))?;
        check.map(&item.outputs, || at("outputs"))?;
        if item.variants.len() > limits.max_map_keys {
            return Err(invalid(
                at("variants"),
                format!("more than {} variants", limits.max_map_keys),
            ));
        }
        for (variant, text) in item.variants.iter().enumerate() {
            check.text(Some(text), || {
                format!("impressions[{index}].variants[{variant}]")
            })?;
        }
    }
    for (index, item) in batch.events.iter().enumerate() {
        let at = |field: &str| format!("events[{index}].{field}");
        check.text(Some(&item.event_id), || at("eventId"))?;
        check.text(Some(&item.name), || at("name"))?;
        check.text(item.impression_id.as_deref(), || at("impressionId"))?;
        check.text(item.feature.as_deref(), || at("feature"))?;
        check.map(&item.fields, || at("fields"))?;
    }
    Ok(())
}

struct Checker<'a> {
    limits: &'a BatchLimits,
}

impl Checker<'_> {
    fn text(&self, text: Option<&str>, field: impl FnOnce() -> String) -> Result<(), BatchError> {
        match text {
            Some(text) if text.len() > self.limits.max_string_bytes => Err(invalid(
                field(),
                format!(
                    "{} bytes long, at most {} allowed",
                    text.len(),
                    self.limits.max_string_bytes
                ),
            )),
            _ => Ok(()),
        }
    }

    fn map(&self, map: &StringMap<'_>, field: impl Fn() -> String) -> Result<(), BatchError> {
        if map.0.len() > self.limits.max_map_keys {
            return Err(invalid(
                field(),
                format!(
                    "{} keys, at most {} allowed",
                    map.0.len(),
                    self.limits.max_map_keys
                ),
            ));
        }
        for (key, value) in &map.0 {
            if key.len() > self.limits.max_string_bytes {
                return Err(invalid(
                    field(),
                    format!(
                        "a key is {} bytes long, at most {} allowed",
                        key.len(),
                        self.limits.max_string_bytes
                    ),
                ));
            }
            self.text(Some(value), || format!("{}.{key}", field()))?;
        }
        Ok(())
    }
}

fn invalid(field: String, message: String) -> BatchError {
    BatchError {
        kind: BatchErrorKind::InvalidField,
        field,
        message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::DeviceIdSources;

    fn parse<'a>(body: &'a str, limits: &BatchLimits) -> Result<Batch<'a>, BatchError> {
        Batch::parse_with(body.as_bytes(), DeviceIdSources::default(), 0, limits)
    }

    #[test]
    fn depth_error_names_path() {
        let limits = BatchLimits {
            max_json_depth: 6,
            ..BatchLimits::default()
        };
        let ok = r#"{"deviceId": "d", "impressions": [{"impressionId": "i", "feature": "f", "args": {"a": [1]}}]}"#;
        assert!(parse(ok, &limits).is_ok());

        let deep = r#"{"deviceId": "d", "impressions": [{"impressionId": "i", "feature": "f",
                       "args": {"x": 1, "a": [[{"b": [1]}]]}}]}"#;
        let err = parse(deep, &limits).unwrap_err();
        assert_eq!(err.field, "impressions[0].args.a[0][0]");
        assert!(err.message.contains("deeper than 6"), "{}", err.message);
    }

    #[test]
    fn depth_scan_ignores_brackets_in_strings() {
        let limits = BatchLimits {
            max_json_depth: 3,
            ..BatchLimits::default()
        };
        let body = r#"{"deviceId": "[[[[{{{{\"", "args": {"k": "]]]]"}}"#;
        assert!(parse(body, &limits).is_ok());
    }

    #[test]
    fn depth_scan_ends_string_after_escaped_backslash() {
        let limits = BatchLimits {
            max_json_depth: 3,
            ..BatchLimits::default()
        };
        // The string ends after `\\`, so the arrays that follow count.
        let body = r#"{"deviceId": "d\\", "args": {"k": [[[1]]]}}"#;
        let err = parse(body, &limits).unwrap_err();
        assert_eq!(err.field, "args.k[0]");
    }

    #[test]
    fn depth_scan_counts_array_index() {
        let limits = BatchLimits {
            max_json_depth: 4,
            ..BatchLimits::default()
        };
        let body = r#"{"deviceId": "d", "events": [{"eventId": "a", "name": "n"}, {"eventId": "b", "name": "n", "fields": {"f": [1]}}]}"#;
        let err = parse(body, &limits).unwrap_err();
        assert_eq!(err.field, "events[1].fields.f");
    }

    #[test]
    fn too_many_items_rejected() {
        let limits = BatchLimits {
            max_items: 2,
            ..BatchLimits::default()
        };
        let two = r#"{"deviceId": "d", "impressions": [{"impressionId": "1", "feature": "f"}, {"impressionId": "2", "feature": "f"}],
                      "events": [{"eventId": "e1", "name": "n"}, {"eventId": "e2", "name": "n"}]}"#;
        assert!(
            parse(two, &limits).is_ok(),
            "the limit applies to each array"
        );

        let three = r#"{"deviceId": "d", "events": [{"eventId": "1", "name": "n"}, {"eventId": "2", "name": "n"}, {"eventId": "3", "name": "n"}]}"#;
        let err = parse(three, &limits).unwrap_err();
        assert_eq!(err.field, "events");
        assert!(err.message.contains("3 items"), "{}", err.message);
    }

    #[test]
    fn overlong_string_names_field() {
        let limits = BatchLimits {
            max_string_bytes: 8,
            ..BatchLimits::default()
        };
        let body = r#"{"deviceId": "d", "events": [{"eventId": "e", "name": "n", "fields": {"k": "0123456789"}}]}"#;
        let err = parse(body, &limits).unwrap_err();
        assert_eq!(err.field, "events[0].fields.k");
        assert!(err.message.contains("10 bytes"), "{}", err.message);

        let body = r#"{"deviceId": "d", "context": {"entryUrl": "https://shop.example/"}}"#;
        assert_eq!(parse(body, &limits).unwrap_err().field, "context.entryUrl");
    }

    #[test]
    fn too_many_map_keys_rejected() {
        let limits = BatchLimits {
            max_map_keys: 2,
            ..BatchLimits::default()
        };
        let body = r#"{"deviceId": "d", "args": {"a": 1, "b": 2, "c": 3}}"#;
        let err = parse(body, &limits).unwrap_err();
        assert_eq!(err.field, "args");
    }
}
