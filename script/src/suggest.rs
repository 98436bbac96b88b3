//! "did you mean …?" for misspelt keys, instruction names and references.

/// Names from other tools (OTP relup, generic CI vocabulary) that people reach for, and what they
/// are called here.
const INSTRUCTION_ALIASES: &[(&str, &str)] = &[
    ("load_module", "load"),
    ("add_module", "load"),
    ("update", "code_change"),
    ("soft_purge", "purge"),
    ("brutal_purge", "purge"),
    ("barrier", "sync_nodes"),
    ("sync", "sync_nodes"),
    ("ponr", "point_of_no_return"),
    ("restart_application", "restart"),
    ("restart_emulator", "restart_new_emulator"),
    ("healthcheck", "health"),
    ("health_check", "health"),
    ("run", "apply"),
    ("exec", "apply"),
    ("command", "apply"),
];

/// The candidate closest to `word` by edit distance, if it is close enough to be a likely typo.
pub(crate) fn closest<'a>(word: &str, candidates: &[&'a str]) -> Option<&'a str> {
    candidates
        .iter()
        .map(|candidate| (strsim::damerau_levenshtein(word, candidate), *candidate))
        .filter(|(distance, candidate)| *distance <= (candidate.chars().count() / 3).max(1))
        .min_by_key(|(distance, _)| *distance)
        .map(|(_, candidate)| candidate)
}

/// Like [`closest`] over owned names.
pub(crate) fn closest_owned<'a>(word: &str, candidates: &'a [String]) -> Option<&'a str> {
    let borrowed: Vec<&str> = candidates.iter().map(String::as_str).collect();
    let found = closest(word, &borrowed)?;
    candidates
        .iter()
        .find(|c| c.as_str() == found)
        .map(String::as_str)
}

/// The known instruction `word` most likely means: an alias from another tool, or a typo.
pub(crate) fn instruction(word: &str, known: &[&'static str]) -> Option<&'static str> {
    INSTRUCTION_ALIASES
        .iter()
        .find(|(alias, _)| alias.eq_ignore_ascii_case(word))
        .map(|(_, name)| *name)
        .or_else(|| closest(&word.to_ascii_lowercase(), known))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Instruction;

    #[test]
    fn suggests_typos_and_aliases() {
        let names = &Instruction::NAMES;
        assert_eq!(instruction("sync_node", names), Some("sync_nodes"));
        assert_eq!(instruction("supend", names), Some("suspend"));
        assert_eq!(instruction("load_module", names), Some("load"));
        assert_eq!(instruction("Resume", names), Some("resume"));
        assert_eq!(instruction("frobnicate", names), None);
    }
}
