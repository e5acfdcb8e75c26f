//! A parser for the common shape of a batch, tried before serde.
//!
//! It reads the body in one pass with no generic visitor machinery, borrowing every string.
//! It returns `None` at anything it does not handle:
//!
//! - an escape or a control character in a string;
//! - an object or array as a map value;
//! - an unknown, repeated or missing field, or a value of the wrong type;
//! - a time that the timestamp rules reject.
//!
//! The caller then parses the body with serde, which either accepts it or names the field that
//! is wrong. A body that this parser accepts gives the same [`BatchBody`] that serde gives. The
//! tests below compare the two on bodies built from templates.

use std::borrow::Cow;

use serde::de::Visitor;

use super::{
    BatchBody, BodyText, ContextBody, EventBody, ImpressionBody, MapEntries, Object, Text,
    Timestamp, TimestampVisitor,
};

/// Parses `text` as a batch; `None` where serde must decide.
pub(super) fn parse(text: &str) -> Option<BatchBody<'_>> {
    let mut parser = Parser {
        bytes: text.as_bytes(),
        text,
        at: 0,
    };
    let body = parser.batch()?;
    parser.skip_whitespace();
    (parser.at == parser.bytes.len()).then_some(body)
}

struct Parser<'a> {
    bytes: &'a [u8],
    text: &'a str,
    at: usize,
}

/// A JSON number as serde_json reads it.
#[derive(Debug, Clone, Copy)]
enum Number {
    Unsigned(u64),
    Signed(i64),
    Float(f64),
}

/// A JSON number's text and the facts that one pass over it found.
#[derive(Debug, Clone, Copy)]
struct ScannedNumber<'a> {
    text: &'a str,
    /// Whether the number has neither a fraction nor an exponent.
    integer: bool,
    /// The value of an integer of at most [`MAX_SMALL_INTEGER_DIGITS`] digits, except `-0`.
    small_integer: Option<i64>,
    /// Whether the text is already the one serde_json writes for the number's `f64`.
    shortest_decimal: bool,
}

/// Maximum number of digits of an integer that always fits both `i64` and `u64`.
const MAX_SMALL_INTEGER_DIGITS: usize = 18;

impl ScannedNumber<'_> {
    /// Reads the number as serde_json does, taking a small integer's value from the scan.
    fn read(&self) -> Option<Number> {
        match self.small_integer {
            Some(value) => Some(match u64::try_from(value) {
                Ok(value) => Number::Unsigned(value),
                Err(_) => Number::Signed(value),
            }),
            None => read_number(self.text, self.integer),
        }
    }
}

/// Reads the text of a JSON number as serde_json does: an integer that fits as `u64` or `i64`,
/// anything else as the `f64` serde_json itself reads from the text.
fn read_number(text: &str, integer: bool) -> Option<Number> {
    // serde_json reads `-0` as the float -0.0, so leave it to serde_json.
    if text == "-0" {
        return None;
    }
    Some(if !integer {
        Number::Float(serde_json::from_str::<f64>(text).ok()?)
    } else if let Ok(value) = text.parse::<u64>() {
        Number::Unsigned(value)
    } else {
        Number::Signed(text.parse::<i64>().ok()?)
    })
}

/// Returns the index of the first of the eight bytes of `word`, read little-endian, that is a
/// quote, a backslash or a control character: a byte that ends a string this parser reads. The
/// bitwise test can also flag an ordinary byte, but only one after a byte that does end a
/// string, so the lowest flag is exact.
fn first_string_end(word: u64) -> Option<usize> {
    const ONES: u64 = u64::from_ne_bytes([0x01; 8]);
    const HIGH: u64 = u64::from_ne_bytes([0x80; 8]);
    // Sets the high bit of each byte of `value` that is below `limit`, for a limit up to 0x80.
    let below = |value: u64, limit: u8| value.wrapping_sub(ONES * u64::from(limit)) & !value & HIGH;
    let quote = word ^ (ONES * u64::from(b'"'));
    let backslash = word ^ (ONES * u64::from(b'\\'));
    let flags = below(word, 0x20) | below(quote, 1) | below(backslash, 1);
    // Each flag is the high bit of its byte, so the byte's index is the bit's index divided by 8.
    (flags != 0).then(|| flags.trailing_zeros() as usize / 8)
}

/// The maximum number of items an item array reserves room for after its first item. A longer
/// array grows as it is read.
const MAX_RESERVED_ITEMS: usize = 256;

/// Sets `slot` once. A field that comes twice makes the parser give up, because serde rejects it.
fn set<T>(slot: &mut Option<T>, value: T) -> Option<()> {
    if slot.is_some() {
        return None;
    }
    *slot = Some(value);
    Some(())
}

impl<'a> Parser<'a> {
    fn skip_whitespace(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.bytes.get(self.at) {
            self.at += 1;
        }
    }

    /// Returns the next byte that is not whitespace, without taking it.
    fn peek(&mut self) -> Option<u8> {
        self.skip_whitespace();
        self.bytes.get(self.at).copied()
    }

    fn eat(&mut self, byte: u8) -> Option<()> {
        (self.peek()? == byte).then(|| self.at += 1)
    }

    fn eat_word(&mut self, word: &str) -> bool {
        self.skip_whitespace();
        let found = self.bytes[self.at..].starts_with(word.as_bytes());
        if found {
            self.at += word.len();
        }
        found
    }

    /// Takes `null` if it comes next.
    fn null(&mut self) -> bool {
        self.eat_word("null")
    }

    /// Reads a string with no escapes and no control characters.
    fn string(&mut self) -> Option<&'a str> {
        self.eat(b'"')?;
        let start = self.at;
        // Eight bytes at a time up to the first byte that ends the string. The loop below then
        // reads that byte, or the last few bytes of the body when they are too few for a word.
        while let Some(word) = self.bytes.get(self.at..self.at + 8) {
            match first_string_end(u64::from_le_bytes(word.try_into().ok()?)) {
                None => self.at += 8,
                Some(place) => {
                    self.at += place;
                    break;
                }
            }
        }
        loop {
            match *self.bytes.get(self.at)? {
                b'"' => break,
                b'\\' | 0x00..=0x1f => return None,
                _ => self.at += 1,
            }
        }
        let end = self.at;
        self.at += 1;
        // The body is valid UTF-8 and the quotes are ASCII, so these are character boundaries.
        self.text.get(start..end)
    }

    fn text(&mut self) -> Option<BodyText<'a>> {
        self.string().map(|text| BodyText(Cow::Borrowed(text)))
    }

    fn optional_text(&mut self) -> Option<Option<BodyText<'a>>> {
        if self.null() {
            return Some(None);
        }
        self.text().map(Some)
    }

    /// Reads a number with the JSON grammar: `-?(0|[1-9][0-9]*)(.[0-9]+)?([eE][+-]?[0-9]+)?`,
    /// in one pass that also fills in the rest of [`ScannedNumber`].
    fn number(&mut self) -> Option<ScannedNumber<'a>> {
        self.skip_whitespace();
        let start = self.at;
        let negative = self.bytes.get(self.at) == Some(&b'-');
        if negative {
            self.at += 1;
        }
        let whole_start = self.at;
        let mut whole: u64 = 0;
        match self.bytes.get(self.at)? {
            b'0' => self.at += 1,
            b'1'..=b'9' => {
                while let Some(&digit @ b'0'..=b'9') = self.bytes.get(self.at) {
                    // Overflows only past 19 digits, and the value is used only up to 18.
                    whole = whole.wrapping_mul(10).wrapping_add(u64::from(digit - b'0'));
                    self.at += 1;
                }
            }
            _ => return None,
        }
        let whole_digits = self.at - whole_start;
        let mut fraction = None;
        if self.bytes.get(self.at) == Some(&b'.') {
            self.at += 1;
            let from = self.at;
            if !self.digits() {
                return None;
            }
            fraction = Some((from, self.at));
        }
        let mut exponent = false;
        if let Some(b'e' | b'E') = self.bytes.get(self.at) {
            self.at += 1;
            exponent = true;
            if let Some(b'+' | b'-') = self.bytes.get(self.at) {
                self.at += 1;
            }
            if !self.digits() {
                return None;
            }
        }
        let text = self.text.get(start..self.at)?;
        let integer = fraction.is_none() && !exponent;
        // serde_json reads `-0` as the float -0.0, so it is not a small integer.
        let small_integer = if integer && whole_digits <= MAX_SMALL_INTEGER_DIGITS {
            let value = i64::try_from(whole).ok()?;
            match (negative, value) {
                (false, _) => Some(value),
                (true, 0) => None,
                (true, _) => Some(-value),
            }
        } else {
            None
        };
        // A decimal with no exponent, no trailing zero, a magnitude from 0.1 up and at most 15
        // significant digits (`f64::DIGITS`) is already the text serde_json writes for its `f64`.
        let shortest_decimal = match fraction {
            Some((from, to)) if !exponent && self.bytes[to - 1] != b'0' => {
                let significant = if whole_digits == 1 && self.bytes[whole_start] == b'0' {
                    (self.bytes[from] != b'0').then_some(to - from)
                } else {
                    Some(whole_digits + to - from)
                };
                significant.is_some_and(|digits| digits <= f64::DIGITS as usize)
            }
            _ => false,
        };
        Some(ScannedNumber {
            text,
            integer,
            small_integer,
            shortest_decimal,
        })
    }

    /// Takes a run of ASCII digits and returns whether there was at least one.
    fn digits(&mut self) -> bool {
        let from = self.at;
        while self.bytes.get(self.at).is_some_and(u8::is_ascii_digit) {
            self.at += 1;
        }
        self.at > from
    }

    /// Hands a number to `visitor` the way serde_json does.
    fn visit_number<V: Visitor<'a>>(&mut self, visitor: V) -> Option<V::Value> {
        let visited: Result<V::Value, serde_json::Error> = match self.number()?.read()? {
            Number::Unsigned(value) => visitor.visit_u64(value),
            Number::Signed(value) => visitor.visit_i64(value),
            Number::Float(value) => visitor.visit_f64(value),
        };
        visited.ok()
    }

    /// Reads a number as the text serde_json writes for it, borrowed from the body when the body
    /// has that text already, as it has for an integer and for most decimals.
    fn number_text(&mut self) -> Option<Text<'a>> {
        let scanned = self.number()?;
        let text = scanned.text;
        if scanned.small_integer.is_some() || scanned.shortest_decimal {
            return Some(Cow::Borrowed(text));
        }
        let Number::Float(value) = scanned.read()? else {
            // JSON has no leading zeros, so an integer that fits is written back as its digits.
            return Some(Cow::Borrowed(text));
        };
        if !value.is_finite() {
            return None;
        }
        // The shortest text that reads back as the same float, as serde_json writes it.
        let mut buffer = zmij::Buffer::new();
        let written = buffer.format_finite(value);
        Some(if written == text {
            Cow::Borrowed(text)
        } else {
            Cow::Owned(written.to_owned())
        })
    }

    fn timestamp(&mut self) -> Option<Option<Timestamp>> {
        if self.null() {
            return Some(None);
        }
        let visited: Result<Timestamp, serde_json::Error> = if self.peek()? == b'"' {
            TimestampVisitor.visit_str(self.string()?)
        } else {
            return self.visit_number(TimestampVisitor).map(Some);
        };
        visited.ok().map(Some)
    }

    /// Calls `field` for each key of an object, with the parser at the key's value.
    fn object(&mut self, mut field: impl FnMut(&mut Self, &'a str) -> Option<()>) -> Option<()> {
        self.eat(b'{')?;
        if self.peek()? == b'}' {
            self.at += 1;
            return Some(());
        }
        loop {
            let key = self.string()?;
            self.eat(b':')?;
            field(self, key)?;
            match self.peek()? {
                b',' => self.at += 1,
                b'}' => {
                    self.at += 1;
                    return Some(());
                }
                _ => return None,
            }
        }
    }

    /// Reads an array, or `null` as `None`, with `element` reading each element.
    fn array<T>(&mut self, element: impl FnMut(&mut Self) -> Option<T>) -> Option<Option<Vec<T>>> {
        self.array_sized(element, |_| 0)
    }

    /// Reads an array of items, which make up most of a body. After the first item, it reserves
    /// room for as many items of that length as the rest of the body could hold, up to
    /// [`MAX_RESERVED_ITEMS`]. The items are then not moved each time the array grows.
    fn items<T>(&mut self, element: impl FnMut(&mut Self) -> Option<T>) -> Option<Option<Vec<T>>> {
        let start = self.at;
        self.array_sized(element, |parser| {
            let first_len = (parser.at - start).max(1);
            ((parser.bytes.len() - parser.at) / first_len).min(MAX_RESERVED_ITEMS)
        })
    }

    /// Reads an array like [`array`](Self::array). After the first element, it reserves room
    /// for the number of further elements that `estimate` returns.
    fn array_sized<T>(
        &mut self,
        mut element: impl FnMut(&mut Self) -> Option<T>,
        estimate: impl FnOnce(&Self) -> usize,
    ) -> Option<Option<Vec<T>>> {
        if self.null() {
            return Some(None);
        }
        self.eat(b'[')?;
        let mut elements = Vec::new();
        if self.peek()? == b']' {
            self.at += 1;
            return Some(Some(elements));
        }
        elements.push(element(self)?);
        if self.peek()? == b',' {
            elements.reserve(estimate(self));
        }
        loop {
            match self.peek()? {
                b',' => {
                    self.at += 1;
                    elements.push(element(self)?);
                }
                b']' => {
                    self.at += 1;
                    return Some(Some(elements));
                }
                _ => return None,
            }
        }
    }

    /// Reads a map of scalar values, or `null` as `None`.
    fn string_map(&mut self) -> Option<Option<MapEntries<'a>>> {
        if self.null() {
            return Some(None);
        }
        let mut entries: Vec<(Text<'a>, Text<'a>)> = Vec::new();
        self.object(|parser, key| {
            let value = parser.map_value()?;
            entries.push((Cow::Borrowed(key), value));
            Some(())
        })?;
        Some(Some(MapEntries(entries)))
    }

    fn map_value(&mut self) -> Option<Text<'a>> {
        let text = match self.peek()? {
            b'"' => Cow::Borrowed(self.string()?),
            b't' if self.eat_word("true") => Cow::Borrowed("true"),
            b'f' if self.eat_word("false") => Cow::Borrowed("false"),
            b'n' if self.null() => Cow::Borrowed("null"),
            b'-' | b'0'..=b'9' => self.number_text()?,
            _ => return None,
        };
        Some(text)
    }

    fn context(&mut self) -> Option<Option<Object<ContextBody<'a>>>> {
        if self.null() {
            return Some(None);
        }
        let mut entry_url = None;
        let mut referrer = None;
        let mut user_agent = None;
        let mut client_type = None;
        self.object(|parser, key| match key {
            "entryUrl" => set(&mut entry_url, parser.optional_text()?),
            "referrer" => set(&mut referrer, parser.optional_text()?),
            "userAgent" => set(&mut user_agent, parser.optional_text()?),
            "clientType" => set(&mut client_type, parser.optional_text()?),
            _ => None,
        })?;
        let context = ContextBody {
            entry_url: entry_url.flatten(),
            referrer: referrer.flatten(),
            user_agent: user_agent.flatten(),
            client_type: client_type.flatten(),
        };
        Some(Some(Object(context)))
    }

    fn impression(&mut self) -> Option<Object<ImpressionBody<'a>>> {
        let mut impression_id = None;
        let mut feature = None;
        let mut time = None;
        let mut args = None;
        let mut outputs = None;
        let mut variants = None;
        self.object(|parser, key| match key {
            "impressionId" => set(&mut impression_id, parser.text()?),
            "feature" => set(&mut feature, parser.text()?),
            "time" => set(&mut time, parser.timestamp()?),
            "args" => set(&mut args, parser.string_map()?),
            "outputs" => set(&mut outputs, parser.string_map()?),
            "variants" => set(&mut variants, parser.array(Self::text)?),
            _ => None,
        })?;
        Some(Object(ImpressionBody {
            impression_id: impression_id?,
            feature: feature?,
            time: time.flatten(),
            args: args.flatten(),
            outputs: outputs.flatten(),
            variants: variants.flatten(),
        }))
    }

    fn event(&mut self) -> Option<Object<EventBody<'a>>> {
        let mut event_id = None;
        let mut name = None;
        let mut time = None;
        let mut impression_id = None;
        let mut feature = None;
        let mut fields = None;
        self.object(|parser, key| match key {
            "eventId" => set(&mut event_id, parser.text()?),
            "name" => set(&mut name, parser.text()?),
            "time" => set(&mut time, parser.timestamp()?),
            "impressionId" => set(&mut impression_id, parser.optional_text()?),
            "feature" => set(&mut feature, parser.optional_text()?),
            "fields" => set(&mut fields, parser.string_map()?),
            _ => None,
        })?;
        Some(Object(EventBody {
            event_id: event_id?,
            name: name?,
            time: time.flatten(),
            impression_id: impression_id.flatten(),
            feature: feature.flatten(),
            fields: fields.flatten(),
        }))
    }

    fn batch(&mut self) -> Option<BatchBody<'a>> {
        let mut device_id = None;
        let mut session_key = None;
        let mut sent_at = None;
        let mut context = None;
        let mut args = None;
        let mut impressions = None;
        let mut events = None;
        self.object(|parser, key| match key {
            "deviceId" => set(&mut device_id, parser.optional_text()?),
            "sessionKey" => set(&mut session_key, parser.optional_text()?),
            "sentAt" => set(&mut sent_at, parser.timestamp()?),
            "context" => set(&mut context, parser.context()?),
            "args" => set(&mut args, parser.string_map()?),
            "impressions" => set(&mut impressions, parser.items(Self::impression)?),
            "events" => set(&mut events, parser.items(Self::event)?),
            _ => None,
        })?;
        Some(BatchBody {
            device_id: device_id.flatten(),
            session_key: session_key.flatten(),
            sent_at: sent_at.flatten(),
            context: context.flatten(),
            args: args.flatten(),
            impressions: impressions.flatten(),
            events: events.flatten(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A batch in which `@` is replaced by each test value in turn.
    const TEMPLATES: &[&str] = &[
        r#"{"deviceId": @, "impressions": [{"impressionId": "i", "feature": "f"}]}"#,
        r#"{"deviceId": "d", "sessionKey": @}"#,
        r#"{"deviceId": "d", "sentAt": @}"#,
        r#"{"deviceId": "d", "context": @}"#,
        r#"{"deviceId": "d", "context": {"entryUrl": @, "clientType": "web"}}"#,
        r#"{"deviceId": "d", "args": @}"#,
        r#"{"deviceId": "d", "args": {"k": @, "a": "1"}}"#,
        r#"{"deviceId": "d", "impressions": @}"#,
        r#"{"deviceId": "d", "impressions": [@]}"#,
        r#"{"deviceId": "d", "impressions": [{"impressionId": @, "feature": "f"}]}"#,
        r#"{"deviceId": "d", "impressions": [{"impressionId": "i", "feature": @}]}"#,
        r#"{"deviceId": "d", "impressions": [{"impressionId": "i", "feature": "f", "time": @}]}"#,
        r#"{"deviceId": "d", "impressions": [{"impressionId": "i", "feature": "f", "args": @}]}"#,
        r#"{"deviceId": "d", "impressions": [{"impressionId": "i", "feature": "f", "outputs": {"k": @}}]}"#,
        r#"{"deviceId": "d", "impressions": [{"impressionId": "i", "feature": "f", "variants": @}]}"#,
        r#"{"deviceId": "d", "impressions": [{"impressionId": "i", "feature": "f", "variants": ["a", @]}]}"#,
        r#"{"deviceId": "d", "events": [{"eventId": @, "name": "n"}]}"#,
        r#"{"deviceId": "d", "events": [{"eventId": "e", "name": "n", "time": @}]}"#,
        r#"{"deviceId": "d", "events": [{"eventId": "e", "name": "n", "impressionId": @}]}"#,
        r#"{"deviceId": "d", "events": [{"eventId": "e", "name": "n", "feature": @}]}"#,
        r#"{"deviceId": "d", "events": [{"eventId": "e", "name": "n", "fields": {"k": @}}]}"#,
        r#"{"deviceId": "d", "events": @}"#,
        r#"@"#,
        r#"{"deviceId": "d"} @"#,
    ];

    /// JSON values and near-JSON text of every kind, valid and not.
    const VALUES: &[&str] = &[
        r#""a""#,
        r#""""#,
        r#""é ☃""#,
        r#""a\"b""#,
        r#""\u00e9""#,
        "\"tab\there\"",
        r#""2024-12-04T11:00:04Z""#,
        r#""2024-12-04T11:00:04.123+01:00""#,
        r#""not a time""#,
        "0",
        "-0",
        "7",
        "-7",
        "1733310000000",
        "1733310000000.9",
        "253402300799999",
        "253402300800000",
        "0.42",
        "1e2",
        "1.5E-3",
        "-1.25",
        "1.50",
        "100.0",
        "0.1",
        "1E2",
        "5e-324",
        "1.7976931348623157e308",
        "-0.0",
        "18446744073709551615",
        "18446744073709551616",
        "9223372036854775808",
        "-9223372036854775808",
        "-9223372036854775809",
        "01",
        "1.",
        ".5",
        "1e",
        "1e400",
        "+1",
        "true",
        "false",
        "null",
        "tru",
        "nul",
        "{}",
        "[]",
        r#"{"k": "v"}"#,
        r#"{"k": 1, "k": 2}"#,
        r#"{"b": "2", "a": "1"}"#,
        r#"{"k": {"a": 1}}"#,
        r#"{"k": [1]}"#,
        r#"["a", "b"]"#,
        "[1]",
        "[null]",
        r#"{"impressionId": "i", "feature": "f"}"#,
        r#"{"impressionId": "i", "feature": "f", "feature": "g"}"#,
        r#"{"impressionId": "i", "feature": "f", "extra": 1}"#,
        r#"{"impressionId": "i"}"#,
        r#"{"eventId": "e", "name": "n"}"#,
        r#"{"entryUrl": "u", "entryUrl": "v"}"#,
        r#"{"entryUrl": null, "referrer": "r"}"#,
        r#"{"impressionId": "i", "feature": "f"} "#,
        "",
        " ",
        "x",
        ",",
        "}",
    ];

    fn serde(text: &str) -> Option<BatchBody<'_>> {
        serde_json::from_str(text).ok()
    }

    #[test]
    fn matches_serde_on_every_template() {
        let mut fast_count = 0;
        for template in TEMPLATES {
            for value in VALUES {
                let body = template.replace('@', value);
                let fast = parse(&body);
                if fast.is_some() {
                    fast_count += 1;
                    assert_eq!(fast, serde(&body), "{body}");
                }
            }
        }
        // Most values of the right type take the fast path.
        assert!(
            fast_count > 150,
            "only {fast_count} bodies took the fast path"
        );
    }

    /// Formats `value` as serde_json writes it.
    fn serde_text(value: f64) -> String {
        serde_json::to_string(&value).unwrap()
    }

    /// Scans `text`, which must be one JSON number and nothing else.
    fn scan(text: &str) -> ScannedNumber<'_> {
        let mut parser = Parser {
            bytes: text.as_bytes(),
            text,
            at: 0,
        };
        let scanned = parser.number().unwrap();
        assert_eq!(scanned.text, text);
        scanned
    }

    /// Returns the value serde_json reads from `text` as an integer, `None` for a float.
    fn serde_integer(text: &str) -> Option<i128> {
        match serde_json::from_str::<serde_json::Number>(text).unwrap() {
            number if number.is_u64() => number.as_u64().map(i128::from),
            number => number.as_i64().map(i128::from),
        }
    }

    #[test]
    fn small_integers_are_what_serde_reads() {
        for text in ["0", "7", "-7", "1733310000000", "999999999999999999"] {
            let value = scan(text).small_integer.map(i128::from);
            assert_eq!(value, serde_integer(text), "{text}");
        }
        // serde_json reads `-0` as a float. The others are too long or not integers, so the
        // parser leaves them to serde_json's own reading.
        for text in [
            "-0",
            "1000000000000000000",
            "18446744073709551615",
            "1.5",
            "1e2",
        ] {
            assert_eq!(scan(text).small_integer, None, "{text}");
        }
    }

    #[test]
    fn shortest_decimals_are_what_serde_writes() {
        for text in [
            "0.42",
            "-1.25",
            "0.1",
            "3.14159265358979",
            "99999999999999.9",
        ] {
            assert!(scan(text).shortest_decimal, "{text}");
            let value: f64 = serde_json::from_str(text).unwrap();
            assert_eq!(serde_text(value), text);
        }
        // serde_json writes some of these otherwise; the others have too many digits to tell.
        for text in [
            "1.50",
            "0.05",
            "1e2",
            "1.5e-3",
            "7",
            "0.1234567890123456",
            "1.0",
        ] {
            assert!(!scan(text).shortest_decimal, "{text}");
        }
    }

    proptest::proptest! {
        #[test]
        fn every_shortest_decimal_reads_back_as_its_text(
            sign in "-?",
            whole in "0|[1-9][0-9]{0,15}",
            fraction in "[0-9]{0,16}[1-9]",
        ) {
            let text = format!("{sign}{whole}.{fraction}");
            if scan(&text).shortest_decimal {
                let value: f64 = serde_json::from_str(&text).unwrap();
                proptest::prop_assert_eq!(serde_text(value), text);
            }
        }

        #[test]
        fn every_small_integer_is_what_serde_reads(text in "-?(0|[1-9][0-9]{0,19})") {
            if let Some(value) = scan(&text).small_integer {
                proptest::prop_assert_eq!(Some(i128::from(value)), serde_integer(&text));
            }
        }
    }

    #[test]
    fn string_end_found_at_every_place() {
        for place in 0..8 {
            for byte in 0..=u8::MAX {
                let mut bytes = [b'a'; 8];
                bytes[place] = byte;
                let ends = matches!(byte, b'"' | b'\\' | 0x00..=0x1f);
                assert_eq!(
                    first_string_end(u64::from_le_bytes(bytes)),
                    ends.then_some(place),
                    "byte {byte:#04x} at {place}"
                );
            }
        }
        // With an end in a word, the first end counts, whatever byte comes at any later place.
        for first in 0..8 {
            for end in [0x00, 0x1f, b'"', b'\\'] {
                for later in first + 1..8 {
                    for byte in 0..=u8::MAX {
                        let mut bytes = [b'a'; 8];
                        bytes[first] = end;
                        bytes[later] = byte;
                        assert_eq!(
                            first_string_end(u64::from_le_bytes(bytes)),
                            Some(first),
                            "{end:#04x} at {first}, {byte:#04x} at {later}"
                        );
                    }
                }
            }
        }
        // Non-ASCII characters, whose bytes are all 0x80 or more, and DEL (0x7f) end nothing.
        for word in ["é☃€", "\u{ff}\u{7f}x", "ÿÿÿÿ"] {
            let mut bytes = [b'a'; 8];
            bytes[..word.len()].copy_from_slice(word.as_bytes());
            assert_eq!(first_string_end(u64::from_le_bytes(bytes)), None, "{word}");
        }
    }

    #[test]
    fn special_byte_anywhere_matches_serde() {
        for len in 0..24 {
            for place in 0..=len {
                for special in ["", "\\\"", "\\n", "\t", "\u{1}", "é"] {
                    let mut text = "x".repeat(len);
                    text.insert_str(place, special);
                    let body = format!(r#"{{"deviceId": "{text}", "sessionKey": "k"}}"#);
                    let fast = parse(&body);
                    let plain = !special.starts_with(['\\', '\t', '\u{1}']);
                    assert_eq!(fast.is_some(), plain, "{body:?}");
                    if fast.is_some() {
                        assert_eq!(fast, serde(&body), "{body:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn repeated_and_unknown_fields_are_left_to_serde() {
        for body in [
            r#"{"deviceId": "d", "deviceId": "e"}"#,
            r#"{"deviceId": null, "deviceId": "e"}"#,
            r#"{"deviceId": "d", "extra": 1}"#,
            r#"{"deviceId": "d", "context": {"pageUrl": "u"}}"#,
            r#"{"deviceId": "d", "events": [{"eventId": "e", "name": "n", "name": "m"}]}"#,
        ] {
            assert_eq!(parse(body), None, "{body}");
            assert_eq!(serde(body), None, "{body}");
        }
    }

    #[test]
    fn typical_batches_take_the_fast_path() {
        let pretty = "{\n  \"deviceId\": \"d-1\",\n  \"sessionKey\": \"tab-1\",\n  \
                      \"sentAt\": 1733310002000,\n  \"context\": {\"userAgent\": \"k6\"},\n  \
                      \"impressions\": [\n    {\"impressionId\": \"i-1\", \"feature\": \"Box\",\n     \
                      \"time\": 1733310000000, \"args\": {\"position\": 3, \"score\": 0.42},\n     \
                      \"outputs\": {\"cta\": \"Rate it\"}, \"variants\": [\"cta:B\"]}\n  ],\n  \
                      \"events\": [{\"eventId\": \"e-1\", \"name\": \"Click\", \
                      \"impressionId\": \"i-1\", \"fields\": {\"stars\": 4}}]\n}\n";
        let compact = r#"{"deviceId":"d-2","args":{"userId":"u-1","plan":"pro"},"impressions":[],"events":[]}"#;
        for body in [pretty, compact] {
            let fast = parse(body);
            assert!(fast.is_some(), "{body}");
            assert_eq!(fast, serde(body));
        }
    }
}
