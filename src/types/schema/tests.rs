//! Tests of the typed schema: parsing, Arrow types, validation, provider schemas.

use super::*;
use serde_json::json;

#[test]
fn maps_types_to_arrow() {
    let s = OutputSchema::new(json!({
        "type": "object",
        "properties": {
            "q": {"type": "array", "items": {"type": "string"}, "minItems": 3, "maxItems": 3},
            "n": {"type": "integer"}, "x": {"type": ["number", "null"]},
            "ok": {"type": "boolean"},
            "inner": {"type": "object", "properties": {"a": {"type": "string"}}}
        },
        "required": ["q"]
    }))
    .unwrap();
    let DataType::Struct(f) = &s.data_type else {
        panic!("{:?}", s.data_type)
    };
    let names: Vec<_> = f.iter().map(|f| f.name().as_str()).collect();
    assert_eq!(names, ["q", "n", "x", "ok", "inner"]);
    assert!(matches!(f[0].data_type(), DataType::List(_)));
    assert_eq!(f[1].data_type(), &DataType::Int64);
    assert_eq!(f[2].data_type(), &DataType::Float64);
}

#[test]
fn rejects_unsupported_schemas_with_path() {
    for (bad, needle) in [
        (json!({"type": "string", "pattern": "x"}), "start it with ^"),
        (
            json!({"type": "string", "pattern": "^(x$"}),
            "not a valid regular expression",
        ),
        (
            json!({"type": "string", "pattern": 5}),
            "pattern must be a string",
        ),
        (json!({"anyOf": []}), "missing \"type\""),
        (json!({"type": "array"}), "items"),
        (
            json!({"type": "object", "properties": {"a": {"type": "date"}}}),
            "properties.a",
        ),
        (
            json!({"type": "array", "items": {"type": "string"}, "minItems": 4, "maxItems": 2}),
            "minItems",
        ),
        (
            json!({"type": "object", "properties": {"a": {"type": "string"}}, "required": ["b"]}),
            "\"b\"",
        ),
    ] {
        let e = OutputSchema::new(bad).unwrap_err().to_string();
        assert!(e.contains(needle), "{e} should contain {needle}");
    }
}

#[test]
fn validates_values() {
    let s = OutputSchema::new(
        json!({"type": "array", "items": {"type": "string"}, "minItems": 3, "maxItems": 3}),
    )
    .unwrap();
    assert!(s.validate(&json!(["a", "b", "c"])).is_ok());
    assert!(
        s.validate(&json!(["a", "b"]))
            .unwrap_err()
            .contains("minItems")
    );
    assert!(
        s.validate(&json!(["a", "b", 3]))
            .unwrap_err()
            .contains("$[2]")
    );
    assert!(s.validate(&json!("x")).is_err());
    let o = OutputSchema::new(json!({"type": "object", "properties": {"a": {"type": "integer", "minimum": 0}}, "required": ["a"], "additionalProperties": false})).unwrap();
    assert!(o.validate(&json!({"a": 1})).is_ok());
    assert!(o.validate(&json!({"a": -1})).is_err());
    assert!(o.validate(&json!({})).is_err());
    assert!(o.validate(&json!({"a": 1, "b": 2})).is_err());
}

#[test]
fn converts_values_to_arrays() {
    let s = OutputSchema::new(json!({"type": "object", "properties": {"a": {"type": "integer"}, "l": {"type": "array", "items": {"type": "string"}}}})).unwrap();
    let arr = s
        .to_array(&[
            Some(&json!({"a": 1, "l": ["x"]})),
            None,
            Some(&json!({"a": 2, "l": []})),
        ])
        .unwrap();
    assert_eq!(arr.len(), 3);
    assert_eq!(arr.null_count(), 1);
    assert_eq!(arr.data_type(), &s.data_type);
}

#[test]
fn wraps_non_object_roots_for_providers() {
    let s = OutputSchema::new(json!({"type": "string"})).unwrap();
    assert!(s.is_wrapped());
    assert_eq!(s.provider_schema()["properties"]["value"]["type"], "string");
    let o = OutputSchema::new(json!({"type": "object", "properties": {"a": {"type": "string"}}}))
        .unwrap();
    assert!(!o.is_wrapped());
    assert_eq!(o.provider_schema()["additionalProperties"], false);
    assert!(!o.strict_compatible());
}

#[test]
fn the_typed_tree_gives_back_the_declared_schema() {
    for declared in [
        json!({"type": "array", "items": {"type": "string"}, "minItems": 3, "maxItems": 3}),
        json!({"type": ["integer", "null"], "minimum": 0, "maximum": 9, "description": "n"}),
        json!({"type": "string", "enum": ["a", "b"], "maxLength": 4}),
        json!({"type": "object", "properties": {"a": {"type": "number", "enum": [1.5, 2]},
               "b": {"type": "boolean"}}, "required": ["a"], "additionalProperties": true}),
    ] {
        let s = OutputSchema::new(declared.clone()).unwrap();
        assert_eq!(s.root.to_json(false), declared);
    }
}

#[test]
fn provider_schemas_close_every_object() {
    let s = OutputSchema::new(json!({"type": "object", "properties": {
        "inner": {"type": "object", "properties": {"a": {"type": "string"}}},
        "list": {"type": "array", "items": {"type": "object", "properties": {"b": {"type": "integer"}}}}
    }, "required": ["inner", "list"]}))
    .unwrap();
    let p = s.provider_schema();
    assert_eq!(p["additionalProperties"], false);
    assert_eq!(p["properties"]["inner"]["additionalProperties"], false);
    assert_eq!(
        p["properties"]["list"]["items"]["additionalProperties"],
        false
    );
    assert!(!s.strict_compatible(), "inner.a is not required");
}

#[test]
fn pattern_is_validated_and_passed_to_the_provider() {
    let s = OutputSchema::new(json!({
        "type": "array",
        "items": {"type": "string", "pattern": "^(What|How) [^?]{5,200}\\?$"},
        "minItems": 1
    }))
    .unwrap();
    assert!(s.validate(&json!(["What was revenue in Q2 2019?"])).is_ok());
    let e = s.validate(&json!(["Revenue was $4 million."])).unwrap_err();
    assert!(e.contains("does not match pattern ^(What|How)"), "{e}");
    assert!(
        s.validate(&json!(["What? no"])).is_err(),
        "the whole string must match"
    );
    let sent = s.provider_schema();
    assert_eq!(
        sent["properties"]["value"]["items"]["pattern"],
        "^(What|How) [^?]{5,200}\\?$"
    );
}

#[test]
fn a_pattern_makes_examples_that_match_it() {
    for (source, chars) in [
        ("^(What|How much|How many) [^\\n\"?]{10,160}[?]$", 80),
        ("^([A-Z$][^\\n\"{}\\\\]{2,240}[.]|I don't know[.])$", 80),
        ("^[0-9]{4}-Q[1-4]$", 10),
        ("^(a|b)+x?$", 5),
    ] {
        let p = Pattern::new(source).unwrap();
        let e = p.example(chars, "the reported revenue growth ").unwrap();
        assert!(p.is_match(&e), "{source}: {e:?}");
        if chars > 40 {
            assert!(
                e.chars().count() >= chars / 2,
                "{source}: {e:?} is about {chars} long"
            );
        }
    }
}
