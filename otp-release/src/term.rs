//! A small reader of Erlang terms as `file:consult/1` reads them (`.rel`, `relup`,
//! `sys.config`): atoms, quoted atoms, strings, integers, floats, tuples, lists (with a `|`
//! tail), maps, binaries of strings, `%` comments, each term ended by a dot. Enough to check a
//! release tarball before anything changes; an input it cannot read is an error with its line,
//! never a panic.

#[derive(Debug, Clone, PartialEq)]
pub enum Term {
    Atom(String),
    Int(i64),
    Float(f64),
    /// A string (a char list in Erlang).
    Str(String),
    Bin(String),
    Tuple(Vec<Term>),
    List(Vec<Term>),
    Map(Vec<(Term, Term)>),
}

impl Term {
    pub fn atom(&self) -> Option<&str> {
        match self {
            Term::Atom(a) => Some(a),
            _ => None,
        }
    }

    /// A string, or a list of small integers (how the shell would print it as a string).
    pub fn string(&self) -> Option<String> {
        match self {
            Term::Str(s) => Some(s.clone()),
            Term::List(items) if items.is_empty() => Some(String::new()),
            _ => None,
        }
    }

    pub fn elements(&self) -> Option<&[Term]> {
        match self {
            Term::Tuple(items) | Term::List(items) => Some(items),
            _ => None,
        }
    }
}

/// Erlang's own way of writing the term (`~0p`-like: atoms bare, strings quoted).
impl std::fmt::Display for Term {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        fn seq(f: &mut std::fmt::Formatter<'_>, items: &[Term]) -> std::fmt::Result {
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    f.write_str(",")?;
                }
                write!(f, "{item}")?;
            }
            Ok(())
        }
        match self {
            Term::Atom(a) => {
                let bare = a.chars().next().is_some_and(|c| c.is_ascii_lowercase())
                    && a.chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '@');
                if bare {
                    f.write_str(a)
                } else {
                    write!(f, "'{}'", a.replace('\\', "\\\\").replace('\'', "\\'"))
                }
            }
            Term::Int(n) => write!(f, "{n}"),
            Term::Float(x) => write!(f, "{x}"),
            Term::Str(s) => write!(f, "{s:?}"),
            Term::Bin(s) => write!(f, "<<{s:?}>>"),
            Term::Tuple(items) => {
                f.write_str("{")?;
                seq(f, items)?;
                f.write_str("}")
            }
            Term::List(items) => {
                f.write_str("[")?;
                seq(f, items)?;
                f.write_str("]")
            }
            Term::Map(pairs) => {
                f.write_str("#{")?;
                for (i, (k, v)) in pairs.iter().enumerate() {
                    if i > 0 {
                        f.write_str(",")?;
                    }
                    write!(f, "{k} => {v}")?;
                }
                f.write_str("}")
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {message}")]
pub struct TermError {
    pub line: usize,
    pub message: String,
}

/// Every term of `text` (each ended by `.`).
pub fn consult(text: &str) -> Result<Vec<Term>, TermError> {
    let mut reader = Reader {
        chars: text.chars().collect(),
        at: 0,
        line: 1,
    };
    let mut terms = Vec::new();
    loop {
        reader.skip_blank();
        if reader.peek().is_none() {
            return Ok(terms);
        }
        let term = reader.term(0)?;
        reader.skip_blank();
        reader.expect('.')?;
        terms.push(term);
    }
}

/// Nesting deeper than this is refused rather than risking the stack.
const MAX_DEPTH: usize = 200;

struct Reader {
    chars: Vec<char>,
    at: usize,
    line: usize,
}

impl Reader {
    fn error(&self, message: impl Into<String>) -> TermError {
        TermError {
            line: self.line,
            message: message.into(),
        }
    }

    fn peek(&self) -> Option<char> {
        self.chars.get(self.at).copied()
    }

    fn bump(&mut self) -> Option<char> {
        let c = self.peek()?;
        self.at += 1;
        if c == '\n' {
            self.line += 1;
        }
        Some(c)
    }

    fn skip_blank(&mut self) {
        while let Some(c) = self.peek() {
            if c == '%' {
                while self.peek().is_some_and(|c| c != '\n') {
                    self.bump();
                }
            } else if c.is_whitespace() {
                self.bump();
            } else {
                return;
            }
        }
    }

    fn expect(&mut self, want: char) -> Result<(), TermError> {
        match self.bump() {
            Some(c) if c == want => Ok(()),
            Some(c) => Err(self.error(format!("expected `{want}`, found `{c}`"))),
            None => Err(self.error(format!("expected `{want}`, found the end of the file"))),
        }
    }

    fn term(&mut self, depth: usize) -> Result<Term, TermError> {
        if depth > MAX_DEPTH {
            return Err(self.error("terms nested too deeply"));
        }
        self.skip_blank();
        match self.peek() {
            None => Err(self.error("expected a term, found the end of the file")),
            Some('{') => {
                self.bump();
                Ok(Term::Tuple(self.sequence('}', depth)?))
            }
            Some('[') => {
                self.bump();
                self.list(depth)
            }
            Some('#') => {
                self.bump();
                self.expect('{')?;
                self.map(depth)
            }
            Some('<') => self.binary(),
            Some('"') => {
                self.bump();
                Ok(Term::Str(self.quoted('"')?))
            }
            Some('\'') => {
                self.bump();
                Ok(Term::Atom(self.quoted('\'')?))
            }
            Some(c) if c.is_ascii_digit() || c == '-' => self.number(),
            Some(c) if c.is_ascii_lowercase() => {
                let mut name = String::new();
                while let Some(c) = self.peek() {
                    if c.is_ascii_alphanumeric() || c == '_' || c == '@' {
                        name.push(c);
                        self.bump();
                    } else {
                        break;
                    }
                }
                Ok(Term::Atom(name))
            }
            Some(c) => Err(self.error(format!("unexpected `{c}`"))),
        }
    }

    /// Terms separated by commas up to `close`.
    fn sequence(&mut self, close: char, depth: usize) -> Result<Vec<Term>, TermError> {
        let mut items = Vec::new();
        self.skip_blank();
        if self.peek() == Some(close) {
            self.bump();
            return Ok(items);
        }
        loop {
            items.push(self.term(depth + 1)?);
            self.skip_blank();
            match self.bump() {
                Some(',') => continue,
                Some(c) if c == close => return Ok(items),
                Some(c) => {
                    return Err(self.error(format!("expected `,` or `{close}`, found `{c}`")));
                }
                None => return Err(self.error(format!("`{close}` missing at the end of the file"))),
            }
        }
    }

    fn list(&mut self, depth: usize) -> Result<Term, TermError> {
        let mut items = Vec::new();
        self.skip_blank();
        if self.peek() == Some(']') {
            self.bump();
            return Ok(Term::List(items));
        }
        loop {
            items.push(self.term(depth + 1)?);
            self.skip_blank();
            match self.bump() {
                Some(',') => continue,
                Some(']') => return Ok(Term::List(items)),
                Some('|') => {
                    match self.term(depth + 1)? {
                        Term::List(tail) => items.extend(tail),
                        other => items.push(other),
                    }
                    self.skip_blank();
                    self.expect(']')?;
                    return Ok(Term::List(items));
                }
                Some(c) => return Err(self.error(format!("expected `,` or `]`, found `{c}`"))),
                None => return Err(self.error("`]` missing at the end of the file")),
            }
        }
    }

    fn map(&mut self, depth: usize) -> Result<Term, TermError> {
        let mut pairs = Vec::new();
        self.skip_blank();
        if self.peek() == Some('}') {
            self.bump();
            return Ok(Term::Map(pairs));
        }
        loop {
            let key = self.term(depth + 1)?;
            self.skip_blank();
            self.expect('=')?;
            self.expect('>')?;
            let value = self.term(depth + 1)?;
            pairs.push((key, value));
            self.skip_blank();
            match self.bump() {
                Some(',') => continue,
                Some('}') => return Ok(Term::Map(pairs)),
                Some(c) => return Err(self.error(format!("expected `,` or `}}`, found `{c}`"))),
                None => return Err(self.error("`}` missing at the end of the file")),
            }
        }
    }

    /// `<<>>` or `<<"text">>`.
    fn binary(&mut self) -> Result<Term, TermError> {
        self.expect('<')?;
        self.expect('<')?;
        self.skip_blank();
        let text = if self.peek() == Some('"') {
            self.bump();
            self.quoted('"')?
        } else {
            String::new()
        };
        self.skip_blank();
        self.expect('>')?;
        self.expect('>')?;
        Ok(Term::Bin(text))
    }

    fn quoted(&mut self, close: char) -> Result<String, TermError> {
        let mut out = String::new();
        loop {
            match self.bump() {
                None => return Err(self.error(format!("unterminated {close}…{close}"))),
                Some(c) if c == close => return Ok(out),
                Some('\\') => match self.bump() {
                    Some('n') => out.push('\n'),
                    Some('t') => out.push('\t'),
                    Some('s') => out.push(' '),
                    Some(c) => out.push(c),
                    None => return Err(self.error("unterminated escape")),
                },
                Some(c) => out.push(c),
            }
        }
    }

    fn number(&mut self) -> Result<Term, TermError> {
        let mut text = String::new();
        if self.peek() == Some('-') {
            text.push('-');
            self.bump();
        }
        while let Some(c) = self.peek() {
            let more = c.is_ascii_digit()
                || c == '_'
                // A dot followed by a digit is a float's; otherwise it ends the term.
                || (c == '.' && self.chars.get(self.at + 1).is_some_and(char::is_ascii_digit))
                || ((c == 'e' || c == 'E') && text.contains('.'));
            if !more {
                break;
            }
            if c != '_' {
                text.push(c);
            }
            self.bump();
        }
        if text.contains('.') {
            text.parse()
                .map(Term::Float)
                .map_err(|_| self.error(format!("`{text}` is not a number")))
        } else {
            text.parse()
                .map(Term::Int)
                .map_err(|_| self.error(format!("`{text}` is not a number")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_what_relx_writes() -> Result<(), TermError> {
        let relup = "%% coding: utf-8\n{\"0.2.0\",\n [{\"0.1.0\",[],\n   [{load_object_code,{pm,\"0.2.0\",[pm]}},\n    point_of_no_return,\n    {update_paths, 'quoted atom'}]}],\n []}.\n";
        let terms = consult(relup)?;
        assert_eq!(terms.len(), 1);
        let top = terms[0].elements().unwrap_or_default();
        assert_eq!(top[0].string().as_deref(), Some("0.2.0"));
        let config = "[{pm, [{n, -12}, {f, 1.5e3}, {m, #{a => <<\"b\">>}}, {l, [a | [b]]}]}].";
        assert_eq!(consult(config)?.len(), 1);
        Ok(())
    }

    #[test]
    fn bad_input_is_an_error_with_its_line() {
        for (text, line) in [
            ("[{pm, [}].", 1),
            ("[\n{pm,\n\"x}].", 3),
            ("{a, b}", 1),
            ("{a, b}.\n{c d}.", 2),
        ] {
            let err = consult(text).err();
            assert_eq!(err.as_ref().map(|e| e.line), Some(line), "{text}: {err:?}");
        }
        let deep = "[".repeat(10_000);
        assert!(consult(&deep).is_err());
    }
}
