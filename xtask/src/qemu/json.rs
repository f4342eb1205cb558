//! Just enough JSON for the store's lines: one flat object of strings, numbers, booleans and
//! nulls (`protocol/src/line.rs` writes them). xtask keeps its dependencies few; this is
//! smaller than a JSON crate.

/// A value of a flat object: a string (unescaped), or the text of anything else.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Value {
    Str(String),
    Other(String),
}

impl Value {
    pub(crate) fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            Value::Other(_) => None,
        }
    }

    pub(crate) fn as_u64(&self) -> Option<u64> {
        match self {
            Value::Other(s) => s.parse().ok(),
            Value::Str(_) => None,
        }
    }
}

/// The fields of one flat JSON object, in order; `None` if `line` is not one.
pub(crate) fn parse_object(line: &str) -> Option<Vec<(String, Value)>> {
    let mut p = Parser {
        chars: line.trim().chars().peekable(),
    };
    p.expect('{')?;
    let mut fields = Vec::new();
    if p.peek_is('}') {
        p.chars.next();
    } else {
        loop {
            let key = p.string()?;
            p.expect(':')?;
            let value = if p.peek_is('"') {
                Value::Str(p.string()?)
            } else {
                Value::Other(p.scalar()?)
            };
            fields.push((key, value));
            match p.next_token()? {
                ',' => continue,
                '}' => break,
                _ => return None,
            }
        }
    }
    p.chars.next().is_none().then_some(fields)
}

struct Parser<'a> {
    chars: std::iter::Peekable<std::str::Chars<'a>>,
}

impl Parser<'_> {
    fn skip_ws(&mut self) {
        while self.chars.peek().is_some_and(|c| c.is_ascii_whitespace()) {
            self.chars.next();
        }
    }

    fn next_token(&mut self) -> Option<char> {
        self.skip_ws();
        self.chars.next()
    }

    fn expect(&mut self, c: char) -> Option<()> {
        (self.next_token()? == c).then_some(())
    }

    fn peek_is(&mut self, c: char) -> bool {
        self.skip_ws();
        self.chars.peek() == Some(&c)
    }

    /// A number, `true`, `false` or `null`, as text.
    fn scalar(&mut self) -> Option<String> {
        self.skip_ws();
        let mut s = String::new();
        while let Some(&c) = self.chars.peek() {
            if c == ',' || c == '}' || c.is_ascii_whitespace() {
                break;
            }
            if !(c.is_ascii_alphanumeric() || matches!(c, '-' | '+' | '.')) {
                return None;
            }
            s.push(c);
            self.chars.next();
        }
        (!s.is_empty()).then_some(s)
    }

    fn string(&mut self) -> Option<String> {
        self.expect('"')?;
        let mut s = String::new();
        loop {
            match self.chars.next()? {
                '"' => return Some(s),
                '\\' => match self.chars.next()? {
                    'n' => s.push('\n'),
                    'r' => s.push('\r'),
                    't' => s.push('\t'),
                    'b' => s.push('\u{8}'),
                    'f' => s.push('\u{c}'),
                    'u' => {
                        let hi = self.hex4()?;
                        let c = if (0xd800..0xdc00).contains(&hi) {
                            // A surrogate pair: `\uD83D\uDE00`.
                            self.expect_raw('\\')?;
                            self.expect_raw('u')?;
                            let lo = self.hex4()?;
                            char::from_u32(
                                0x10000 + ((hi - 0xd800) << 10) + (lo.checked_sub(0xdc00)?),
                            )
                        } else {
                            char::from_u32(hi)
                        };
                        s.push(c.unwrap_or(char::REPLACEMENT_CHARACTER));
                    }
                    c => s.push(c),
                },
                c => s.push(c),
            }
        }
    }

    fn expect_raw(&mut self, c: char) -> Option<()> {
        (self.chars.next()? == c).then_some(())
    }

    fn hex4(&mut self) -> Option<u32> {
        let mut v = 0;
        for _ in 0..4 {
            v = v * 16 + self.chars.next()?.to_digit(16)?;
        }
        Some(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_store_line() {
        let line = r#"{"ts":"2026-11-21T14:03:05.123456Z","device":"qemu-x86_64","boot":"b6a4","seq":42,"mono_us":5012345,"level":6,"facility":0,"origin":"kmsg","msg":"a \"b\" \\ \u00e9 \ud83d\ude00\tz"}"#;
        let f = parse_object(line).unwrap_or_default();
        let get = |k: &str| f.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        assert_eq!(get("seq").and_then(|v| v.as_u64()), Some(42));
        assert_eq!(
            get("msg").and_then(|v| v.as_str().map(str::to_owned)),
            Some("a \"b\" \\ é 😀\tz".to_owned())
        );
        assert_eq!(get("origin"), Some(Value::Str("kmsg".into())));
    }

    #[test]
    fn refuses_what_is_not_one_flat_object() {
        for bad in [
            "",
            "{",
            r#"{"a":1"#,
            r#"{"a":[1]}"#,
            r#"{"a":{"b":1}}"#,
            r#"{"a":1} x"#,
            r#"{"a":"x}"#,
        ] {
            assert_eq!(parse_object(bad), None, "{bad}");
        }
        assert_eq!(parse_object("{}"), Some(Vec::new()));
    }
}
