//! Which engagement counters live in the profile row.
//!
//! The built-in behaviour kinds (the names IngestService sends, one per event) are counted in
//! BIGINT columns of `profiles` (`eng_<kind>`, migration 0004 on both engines), so the fold
//! that ApplyAggregates runs writes one row per profile rather than one profile row plus one
//! `engagement` row per (profile, kind). Any other name ApplyAggregates accepts is counted in
//! the `engagement` table as before. Readers see one map either way: a row counter appears in
//! it when it is not zero, as a table counter appears once it has been incremented.
//!
//! The list must match the columns of migration 0004 and the kind lists in its PostgreSQL
//! functions (`prof_fold_deltas`, `prof_merge`). The store conformance test
//! `every_engagement_counter_adds_up_across_a_merge` counts every listed kind and one other
//! name on each engine, so a kind missing from a function's list shows as a lost or doubled
//! count.

/// (engagement name, column in `profiles`) of every counter kept in the profile row.
pub const ROW_ENGAGEMENT: [(&str, &str); 13] = [
    ("product_viewed", "eng_product_viewed"),
    ("cart_updated", "eng_cart_updated"),
    ("cart_abandoned", "eng_cart_abandoned"),
    ("searched", "eng_searched"),
    ("page_viewed", "eng_page_viewed"),
    ("screen_viewed", "eng_screen_viewed"),
    ("app_opened", "eng_app_opened"),
    ("email_opened", "eng_email_opened"),
    ("email_clicked", "eng_email_clicked"),
    ("push_clicked", "eng_push_clicked"),
    ("review_submitted", "eng_review_submitted"),
    ("survey_responded", "eng_survey_responded"),
    ("custom", "eng_custom"),
];

/// The index in [`ROW_ENGAGEMENT`] of the counter named `kind`, `None` for a name counted in
/// the `engagement` table.
pub fn row_counter(kind: &str) -> Option<usize> {
    ROW_ENGAGEMENT.iter().position(|(name, _)| *name == kind)
}

/// Increments of one profile's row counters, in [`ROW_ENGAGEMENT`] order.
pub type RowCounters = [i64; ROW_ENGAGEMENT.len()];

/// The row columns joined with `", "` (for a SELECT list).
pub fn column_list() -> String {
    ROW_ENGAGEMENT
        .iter()
        .map(|(_, c)| *c)
        .collect::<Vec<_>>()
        .join(", ")
}

/// `col = <f(col)>` for every row column, joined with `", "` (for an UPDATE's SET list).
pub fn set_list(f: impl Fn(&str) -> String) -> String {
    ROW_ENGAGEMENT
        .iter()
        .map(|(_, c)| format!("{c} = {}", f(c)))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_row_counter_has_its_own_column_named_after_it() {
        for (i, (name, column)) in ROW_ENGAGEMENT.iter().enumerate() {
            assert_eq!(*column, format!("eng_{name}"));
            assert_eq!(row_counter(name), Some(i));
        }
    }

    #[test]
    fn names_outside_the_list_are_table_counters() {
        assert_eq!(row_counter("loyalty.quiz_completed"), None);
        assert_eq!(row_counter("order_completed"), None);
        assert_eq!(row_counter(""), None);
    }

    #[test]
    fn lists_name_every_column_once() {
        assert_eq!(column_list().matches("eng_").count(), ROW_ENGAGEMENT.len());
        let set = set_list(|c| format!("{c} + 1"));
        assert!(
            set.starts_with("eng_product_viewed = eng_product_viewed + 1, eng_cart_updated = ")
        );
        assert!(set.ends_with("eng_custom = eng_custom + 1"));
        assert_eq!(set.matches(" = ").count(), ROW_ENGAGEMENT.len());
    }
}
