//! Building and reading the few Erlang terms the BEAM runtime exchanges with its helper module.
//! Module and function names become atoms only after [`crate::config::is_atom`] accepted them;
//! everything else (object code, child ids, `extra`, `apply` arguments) travels as binaries.

use erl_dist::term::{Atom, Binary, FixInteger, List, Term, Tuple};

pub fn atom(name: &str) -> Term {
    Term::from(Atom::from(name))
}

pub fn bin(bytes: impl Into<Vec<u8>>) -> Term {
    Term::from(Binary::from(bytes.into()))
}

pub fn int(value: u64) -> Term {
    Term::from(FixInteger::from(i32::try_from(value).unwrap_or(i32::MAX)))
}

pub fn tuple(elements: Vec<Term>) -> Term {
    Term::from(Tuple::from(elements))
}

pub fn list(elements: Vec<Term>) -> Term {
    Term::from(List::from(elements))
}

pub fn boolean(value: bool) -> Term {
    atom(if value { "true" } else { "false" })
}

/// The elements of a tuple whose first element is the atom `tag`.
pub fn tagged<'a>(term: &'a Term, tag: &str) -> Option<&'a [Term]> {
    match term {
        Term::Tuple(t) => match t.elements.first() {
            Some(Term::Atom(a)) if a.name == tag => Some(&t.elements[1..]),
            _ => None,
        },
        _ => None,
    }
}

pub fn is_atom(term: &Term, name: &str) -> bool {
    matches!(term, Term::Atom(a) if a.name == name)
}

pub fn as_i64(term: &Term) -> Option<i64> {
    match term {
        Term::FixInteger(i) => Some(i64::from(i.value)),
        Term::BigInteger(b) => b.value.to_string().parse().ok(),
        _ => None,
    }
}

/// A binary or a char list as text; any other term printed.
pub fn text(term: &Term) -> String {
    match term {
        Term::Binary(b) => String::from_utf8_lossy(&b.bytes).into_owned(),
        Term::ByteList(b) => String::from_utf8_lossy(&b.bytes).into_owned(),
        Term::List(l) if l.elements.is_empty() => String::new(),
        other => other.to_string(),
    }
}

/// A list of binaries (or char lists) as texts; anything else is no texts.
pub fn texts(term: &Term) -> Vec<String> {
    match term {
        Term::List(l) => l.elements.iter().map(text).collect(),
        _ => Vec::new(),
    }
}
