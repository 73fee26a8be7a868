//! A deterministic generator of realistic earnings-call transcripts (fictional companies), for the
//! demo corpus and for benchmarks that need large inputs without committing them.
//!
//! Each record has the fields of the reference data: `ticker`, `q` (quarter, `2024-Q3`), `date`
//! and `transcript`. A transcript has an operator introduction, prepared remarks by the CEO and
//! the CFO with revenue, growth, margins, EPS, cash and guidance, and a question-and-answer
//! session; speaker turns are paragraphs separated by newlines, and a company's figures evolve
//! consistently from quarter to quarter. The same seed gives the same bytes.

use std::io::Write;

use serde_json::json;

const PREFIXES: &[&str] = &[
    "North", "Blue", "Iron", "Silver", "Cedar", "Harbor", "Summit", "Granite", "Pioneer", "Atlas",
    "Beacon", "Crescent", "Falcon", "Meridian", "Orchard", "Redwood", "Sterling", "Tidal",
];
const SUFFIXES: &[&str] = &[
    "wind", "field", "gate", "stone", "bridge", "point", "line", "crest", "ridge", "vale",
];
const INDUSTRIES: &[(&str, &str, &[&str])] = &[
    (
        "Semiconductor",
        "wafer fab equipment",
        &["deposition", "etch", "inspection"],
    ),
    (
        "Foods",
        "grocery retail",
        &["fresh", "center store", "pharmacy"],
    ),
    (
        "Software",
        "cloud software",
        &["subscriptions", "professional services", "platform"],
    ),
    (
        "Logistics",
        "freight and logistics",
        &["truckload", "intermodal", "warehousing"],
    ),
    (
        "Health",
        "medical devices",
        &["cardiology", "orthopedics", "diagnostics"],
    ),
    ("Energy", "renewable power", &["solar", "wind", "storage"]),
];
const FIRST: &[&str] = &[
    "Maria", "James", "Aiko", "David", "Priya", "Tomás", "Grace", "Olusegun", "Elena", "Marcus",
    "Sofia", "Henrik", "Leila", "Daniel", "Mei", "Carlos",
];
const LAST: &[&str] = &[
    "Alvarez",
    "Chen",
    "Okafor",
    "Lindqvist",
    "Patel",
    "Novak",
    "Brennan",
    "Sato",
    "Haddad",
    "Moreau",
    "Kowalski",
    "Reyes",
    "Fischer",
    "Nakamura",
    "Osei",
    "Walsh",
];
const BANKS: &[&str] = &[
    "Morgan Stanley",
    "Goldman Sachs",
    "JP Morgan",
    "Bank of America",
    "UBS",
    "Barclays",
    "Jefferies",
    "Cowen",
    "Piper Sandler",
    "Wells Fargo",
];
const MONTHS: &[&str] = &[
    "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
];

struct Company {
    name: String,
    ticker: String,
    industry: &'static str,
    segments: &'static [&'static str],
    ceo: String,
    cfo: String,
    revenue: f64,
    gross_margin: f64,
    shares: f64,
    cash: f64,
    employees: u64,
}

fn pick<'a, T>(rng: &mut fastrand::Rng, items: &'a [T]) -> &'a T {
    &items[rng.usize(..items.len())]
}

fn person(rng: &mut fastrand::Rng) -> String {
    format!("{} {}", pick(rng, FIRST), pick(rng, LAST))
}

fn company(rng: &mut fastrand::Rng, index: usize) -> Company {
    let (kind, industry, segments) = *pick(rng, INDUSTRIES);
    let name = format!("{}{} {kind}", pick(rng, PREFIXES), pick(rng, SUFFIXES));
    let letters: String = name
        .chars()
        .filter(|c| c.is_ascii_uppercase())
        .chain(name.chars().skip(1).filter(|c| c.is_ascii_lowercase()))
        .take(3)
        .collect::<String>()
        .to_uppercase();
    Company {
        ticker: format!("{letters}{}", (b'A' + (index % 26) as u8) as char),
        name,
        industry,
        segments,
        ceo: person(rng),
        cfo: person(rng),
        revenue: 150.0 + rng.f64() * 2500.0,
        gross_margin: 28.0 + rng.f64() * 40.0,
        shares: 40.0 + rng.f64() * 400.0,
        cash: 80.0 + rng.f64() * 900.0,
        employees: 800 + rng.u64(..40_000),
    }
}

fn money(m: f64) -> String {
    if m >= 1000.0 {
        format!("${:.2} billion", m / 1000.0)
    } else {
        format!("${m:.1} million")
    }
}

/// The figures of one quarter of `c` (advancing them), drawn in a fixed order from `rng`.
struct Quarter {
    prev: f64,
    yoy: f64,
    op_margin: f64,
    net: f64,
    eps: f64,
    buyback: f64,
    capex: f64,
    next_lo: f64,
    next_hi: f64,
    fy_lo: f64,
    fy_hi: f64,
    shares: Vec<f64>,
    seg_growth: Vec<f64>,
    analysts: Vec<(String, &'static str)>,
    ir: String,
}

fn quarter_figures(rng: &mut fastrand::Rng, c: &mut Company) -> Quarter {
    let growth = -4.0 + rng.f64() * 22.0;
    let prev = c.revenue;
    c.revenue *= 1.0 + growth / 300.0;
    let yoy = growth;
    c.gross_margin = (c.gross_margin + rng.f64() * 2.0 - 0.8).clamp(15.0, 85.0);
    let op_margin = (c.gross_margin - 12.0 - rng.f64() * 10.0).max(1.0);
    let net = c.revenue * op_margin / 100.0 * 0.78;
    let eps = net / c.shares;
    c.cash = (c.cash + net * 0.6 - rng.f64() * 40.0).max(20.0);
    c.employees += rng.u64(..400);
    let buyback = 10.0 + rng.f64() * 90.0;
    let capex = c.revenue * (0.03 + rng.f64() * 0.06);
    let next_lo = c.revenue * (0.98 + rng.f64() * 0.03);
    let next_hi = next_lo * (1.02 + rng.f64() * 0.03);
    let fy_lo = c.revenue * 3.9;
    let fy_hi = fy_lo * 1.04;
    let shares: Vec<f64> = {
        let a = 30.0 + rng.f64() * 30.0;
        let b = (100.0 - a) * (0.4 + rng.f64() * 0.3);
        vec![a, b, 100.0 - a - b]
    };
    let seg_growth: Vec<f64> = (0..3).map(|_| -6.0 + rng.f64() * 30.0).collect();
    let analysts: Vec<(String, &str)> = (0..3).map(|_| (person(rng), *pick(rng, BANKS))).collect();
    let ir = person(rng);
    Quarter {
        prev,
        yoy,
        op_margin,
        net,
        eps,
        buyback,
        capex,
        next_lo,
        next_hi,
        fy_lo,
        fy_hi,
        shares,
        seg_growth,
        analysts,
        ir,
    }
}

/// The operator's opening and the CEO's prepared remarks.
fn prepared_remarks(
    rng: &mut fastrand::Rng,
    c: &Company,
    f: &Quarter,
    year: u32,
    quarter: u32,
) -> Vec<String> {
    let (prev, yoy, shares, seg_growth, ir) = (f.prev, f.yoy, &f.shares, &f.seg_growth, &f.ir);
    vec![
        "Prepared Remarks:".into(),
        "Operator".into(),
        format!(
            "Good day, and welcome to the {} results call for the {} quarter \
             of fiscal {year}. At this time, all participants are in a listen-only mode. As a \
             reminder, this conference is being recorded. I would now like to turn the call over \
             to {ir}, Head of Investor Relations.",
            c.name,
            ["first", "second", "third", "fourth"][(quarter - 1) as usize]
        ),
        format!("{ir} -- Head of Investor Relations"),
        format!(
            "Thank you, operator. Joining me today are {}, our Chief Executive Officer, and {}, \
             our Chief Financial Officer. Today's discussion contains forward-looking statements \
             that are subject to risks and uncertainties. Reconciliations of non-GAAP measures are \
             in the press release we issued this afternoon.",
            c.ceo, c.cfo
        ),
        format!("{} -- Chief Executive Officer", c.ceo),
        format!(
            "Thanks, {}. We delivered a solid quarter in {}. Revenue was {}, up {:.1}% year over \
             year and {} from {} last quarter, ahead of the midpoint of our guidance. Demand in \
             {} remained healthy, and we ended the quarter with a backlog that gives us good \
             visibility into the second half.",
            ir.split(' ').next().unwrap_or(""),
            c.industry,
            money(c.revenue),
            yoy,
            if c.revenue >= prev { "up" } else { "down" },
            money(prev),
            c.segments[0]
        ),
        format!(
            "By segment, {} represented {:.0}% of revenue and grew {:.1}%; {} was {:.0}% of revenue \
             with growth of {:.1}%; and {} contributed the remaining {:.0}%, {} {:.1}%. We added \
             {} customers in the quarter and our headcount reached {} employees.",
            c.segments[0],
            shares[0],
            seg_growth[0],
            c.segments[1],
            shares[1],
            seg_growth[1],
            c.segments[2],
            shares[2],
            if seg_growth[2] >= 0.0 { "up" } else { "down" },
            seg_growth[2].abs(),
            20 + rng.u32(..400),
            c.employees
        ),
    ]
}

/// The CFO's remarks: margins, cash and guidance.
fn cfo_remarks(rng: &mut fastrand::Rng, c: &Company, f: &Quarter) -> Vec<String> {
    let (op_margin, net, eps, buyback, capex) = (f.op_margin, f.net, f.eps, f.buyback, f.capex);
    let (next_lo, next_hi, fy_lo, fy_hi) = (f.next_lo, f.next_hi, f.fy_lo, f.fy_hi);
    vec![
        format!("{} -- Chief Financial Officer", c.cfo),
        format!(
            "Thank you, {}. Gross margin was {:.1}%, {} {} basis points from a year ago, driven by \
             mix and productivity. Operating expenses were {}, and operating margin was {:.1}%. \
             GAAP net income was {}, or ${:.2} per diluted share, on {:.1} million diluted shares.",
            c.ceo.split(' ').next().unwrap_or(""),
            c.gross_margin,
            if rng.bool() { "up" } else { "down" },
            10 + rng.u32(..190),
            money(c.revenue * (c.gross_margin - op_margin) / 100.0),
            op_margin,
            money(net),
            eps,
            c.shares
        ),
        format!(
            "We generated {} of operating cash flow, invested {} in capital expenditures and \
             returned {} to shareholders through repurchases. We ended the quarter with cash and \
             short-term investments of {} and total debt of {}.",
            money(net * 1.2),
            money(capex),
            money(buyback),
            money(c.cash),
            money(c.cash * (0.2 + rng.f64() * 0.8))
        ),
        format!(
            "Turning to guidance. For the next quarter we expect revenue in the range of {} to {} \
             and gross margin of {:.1}% to {:.1}%. For the full year we now expect revenue of {} to \
             {}, and we are raising our EPS outlook to ${:.2} to ${:.2}.",
            money(next_lo),
            money(next_hi),
            c.gross_margin - 1.0,
            c.gross_margin + 0.5,
            money(fy_lo),
            money(fy_hi),
            eps * 3.9,
            eps * 4.2
        ),
    ]
}

/// The analysts' questions and the answers, to the end of the call.
fn questions_and_answers(rng: &mut fastrand::Rng, c: &Company, f: &Quarter) -> Vec<String> {
    let Quarter {
        buyback,
        seg_growth,
        analysts,
        ..
    } = f;
    let buyback = *buyback;
    vec![
        "Questions and Answers:".into(),
        "Operator".into(),
        format!(
            "Our first question comes from {} with {}. Please go ahead.",
            analysts[0].0, analysts[0].1
        ),
        format!("{} -- {} -- Analyst", analysts[0].0, analysts[0].1),
        format!(
            "Congratulations on the quarter. Could you unpack the {:.1}% growth in {} and how much \
             of that was pricing versus volume?",
            seg_growth[0], c.segments[0]
        ),
        format!("{} -- Chief Executive Officer", c.ceo),
        format!(
            "Sure. Roughly {}% of the growth came from volume and the rest from price. Pricing \
             actions we took in the prior quarter added about {} basis points, and we expect that \
             to annualize by the fourth quarter.",
            40 + rng.u32(..45),
            50 + rng.u32(..250)
        ),
        "Operator".into(),
        format!(
            "Our next question comes from {} with {}.",
            analysts[1].0, analysts[1].1
        ),
        format!("{} -- {} -- Analyst", analysts[1].0, analysts[1].1),
        format!(
            "On margins: what gets you from {:.1}% gross margin today to the long-term target, and \
             how should we think about operating expenses next year?",
            c.gross_margin
        ),
        format!("{} -- Chief Financial Officer", c.cfo),
        format!(
            "Our long-term target remains {:.0}% to {:.0}%. About half of the gap closes with the \
             {} consolidation we announced, worth roughly {} a year in savings. We expect \
             operating expenses to grow {:.0}% to {:.0}% next year, below revenue growth.",
            c.gross_margin + 2.0,
            c.gross_margin + 5.0,
            c.segments[2],
            money(c.revenue * 0.02),
            2.0 + rng.f64() * 3.0,
            5.0 + rng.f64() * 3.0
        ),
        "Operator".into(),
        format!(
            "Our final question comes from {} with {}.",
            analysts[2].0, analysts[2].1
        ),
        format!("{} -- {} -- Analyst", analysts[2].0, analysts[2].1),
        "Can you talk about capital allocation and whether the buyback pace continues?".into(),
        format!("{} -- Chief Executive Officer", c.ceo),
        format!(
            "We repurchased {} this quarter and have {} remaining on the authorization. With {} of \
             cash, we can keep investing in {} while returning capital. Thank you all for joining \
             us today.",
            money(buyback),
            money(buyback * (3.0 + rng.f64() * 5.0)),
            money(c.cash),
            c.segments[1]
        ),
        "Operator".into(),
        "This concludes today's conference call. Thank you for participating.".into(),
    ]
}

/// One quarter's transcript for `c`, advancing its figures.
fn transcript(rng: &mut fastrand::Rng, c: &mut Company, year: u32, quarter: u32) -> String {
    let f = quarter_figures(rng, c);
    let mut p = prepared_remarks(rng, c, &f, year, quarter);
    p.extend(cfo_remarks(rng, c, &f));
    p.extend(questions_and_answers(rng, c, &f));
    p.retain(|s| !s.is_empty());
    p.join("\n")
}

/// Writes transcripts as JSON lines: `companies` companies × `quarters` consecutive quarters,
/// stopping early once `max_bytes` have been written (if given). Returns (records, bytes).
pub fn write_corpus(
    out: &mut dyn Write,
    seed: u64,
    companies: usize,
    quarters: usize,
    max_bytes: Option<u64>,
) -> std::io::Result<(u64, u64)> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut list: Vec<Company> = (0..companies).map(|i| company(&mut rng, i)).collect();
    let (mut records, mut bytes) = (0u64, 0u64);
    for qi in 0..quarters {
        let year = 2022 + (qi / 4) as u32;
        let quarter = (qi % 4) as u32 + 1;
        for c in list.iter_mut() {
            if max_bytes.is_some_and(|m| bytes >= m) {
                return Ok((records, bytes));
            }
            let text = transcript(&mut rng, c, year, quarter);
            let month = MONTHS[((quarter * 3) % 12) as usize];
            let day = 1 + rng.u32(..28);
            let hour = [8, 10, 16, 17][rng.usize(..4)];
            let ampm = if hour < 12 { "a.m." } else { "p.m." };
            let year_of_call = if quarter == 4 { year + 1 } else { year };
            let line = json!({
                "ticker": c.ticker,
                "q": format!("{year}-Q{quarter}"),
                "date": format!("{month} {day}, {year_of_call}, {}:00 {ampm} ET", hour % 12),
                "transcript": text,
            })
            .to_string();
            out.write_all(line.as_bytes())?;
            out.write_all(b"\n")?;
            records += 1;
            bytes += line.len() as u64 + 1;
        }
    }
    Ok((records, bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_and_well_formed() {
        let mut a = Vec::new();
        let mut b = Vec::new();
        write_corpus(&mut a, 7, 3, 2, None).unwrap();
        write_corpus(&mut b, 7, 3, 2, None).unwrap();
        assert_eq!(a, b);
        let text = String::from_utf8(a).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 6);
        for l in lines {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            let t = v["transcript"].as_str().unwrap();
            assert!(t.len() > 2500, "{}", t.len());
            assert!(t.contains('%') && t.contains('$'));
            assert!(v["q"].as_str().unwrap().starts_with("2022-Q"));
        }
    }

    #[test]
    fn stops_at_the_byte_budget() {
        let mut out = Vec::new();
        let (records, bytes) = write_corpus(&mut out, 1, 10, 100, Some(50_000)).unwrap();
        assert!((50_000..60_000).contains(&bytes), "{bytes}");
        assert_eq!(out.len() as u64, bytes);
        assert!(records > 5);
    }
}
