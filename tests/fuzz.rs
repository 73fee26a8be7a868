//! Property tests (proptest) of the two parsers that see untrusted input: the JSON-schema → Arrow
//! conversion with response validation, and the parsing of provider responses. Neither may
//! panic on any input; a value that validates must convert to the declared Arrow type; invalid
//! content is an error, never a value.

use proptest::prelude::*;
use serde_json::{Value, json};
use sluice::llm::{ErrorKind, LlmResponse, parse_response};
use sluice::udf::schema::OutputSchema;

/// Arbitrary JSON values, nested a few levels.
fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|i| json!(i)),
        (-1e9f64..1e9).prop_map(|f| json!(f)),
        ".{0,12}".prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map("[a-c]{1,2}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Arbitrary schemas of the supported subset (and, sometimes, unsupported keywords).
fn any_schema() -> impl Strategy<Value = Value> {
    let scalar = prop_oneof![
        Just(json!({"type": "string"})),
        Just(json!({"type": "string", "minLength": 1, "maxLength": 5})),
        Just(json!({"type": "integer", "minimum": 0})),
        Just(json!({"type": "number"})),
        Just(json!({"type": "boolean"})),
        Just(json!({"type": ["string", "null"]})),
        Just(json!({"type": "string", "enum": ["a", "b"]})),
        Just(json!({"type": "string", "pattern": "x"})),
    ];
    scalar.prop_recursive(3, 16, 3, |inner| {
        prop_oneof![
            (inner.clone(), 0u64..3, 0u64..4).prop_map(|(items, min, extra)| json!({
                "type": "array", "items": items, "minItems": min, "maxItems": min + extra
            })),
            prop::collection::btree_map("[a-c]", inner, 1..3).prop_map(|props| {
                let required: Vec<&String> = props.keys().take(1).collect();
                json!({"type": "object", "properties": props, "required": required})
            }),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    #[test]
    fn schema_conversion_never_panics_and_valid_values_convert(
        schema in any_schema(),
        values in prop::collection::vec(any_json(), 0..6),
    ) {
        let Ok(s) = OutputSchema::new(schema) else { return Ok(()); };
        let valid: Vec<Option<Value>> = values
            .into_iter()
            .map(|v| s.validate(&v).is_ok().then_some(v))
            .collect();
        let array = s.to_array(&valid.iter().map(Option::as_ref).collect::<Vec<_>>());
        prop_assert!(array.is_ok(), "validated values must convert: {:?}", array.err());
        let array = array.unwrap();
        prop_assert_eq!(array.len(), valid.len());
        prop_assert_eq!(array.data_type(), &s.data_type);
    }

    #[test]
    fn response_parsing_never_panics_and_never_accepts_invalid_content(
        schema in any_schema(),
        content in prop_oneof![any_json().prop_map(|v| v.to_string()), ".{0,40}"],
        finish in prop_oneof![Just("stop"), Just("length"), Just("content_filter")],
    ) {
        let Ok(s) = OutputSchema::new(schema) else { return Ok(()); };
        let resp = LlmResponse {
            content: content.clone(),
            finish_reason: Some(finish.to_string()),
            usage: None,
        };
        match parse_response(Some(&s), &resp) {
            Ok(v) => {
                prop_assert_ne!(finish, "length");
                prop_assert!(s.validate(&v).is_ok(), "accepted an invalid value {}", v);
            }
            Err(e) => prop_assert!(matches!(
                e.kind,
                ErrorKind::Truncated | ErrorKind::Empty | ErrorKind::InvalidOutput
            )),
        }
    }
}
