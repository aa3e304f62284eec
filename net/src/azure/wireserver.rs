//! The WireServer side of provisioning: fetch the goal state, report Ready.
//!
//! What Azure's own agents do (WALinuxAgent `wire.py`, `goal_state.py`; facts sheet
//! section 9): `GET /machine/?comp=goalstate` with `x-ms-version: 2012-11-30` and an
//! `x-ms-agent-name`, read `Incarnation`, `Container/ContainerId` and the first
//! `Container/RoleInstanceList/RoleInstance/InstanceId`, then `POST /machine?comp=health`
//! with `Content-Type: text/xml;charset=utf-8` and a `Health` document naming them, with
//! state `Ready`. HTTP 200, 201 and 202 mean the report was taken.
//!
//! The goal state comes from the network, so it is read by [`XmlReader`]: a small,
//! bounded, non-validating XML tokenizer that never panics. It checks that elements nest
//! properly, skips the declaration, comments and processing instructions, reads CDATA,
//! decodes the five predefined entities and character references, and refuses document
//! type declarations (so no entity expansion of any kind). Depth is bounded by
//! [`MAX_DEPTH`] and the values kept by [`MAX_ID_LEN`]. Everything written into the
//! health report is XML-escaped ([`escape_xml`]).

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;
use core::fmt::Write as _;
use core::net::Ipv4Addr;

use super::http_client::encode_request;

/// The protocol version Azure's agents send (`x-ms-version`).
pub const WIRESERVER_VERSION: &str = "2012-11-30";
/// Where the goal state is.
pub const GOAL_STATE_PATH: &str = "/machine/?comp=goalstate";
/// Where health reports go.
pub const HEALTH_PATH: &str = "/machine?comp=health";
/// Content type of the health report.
pub const HEALTH_CONTENT_TYPE: &str = "text/xml;charset=utf-8";
/// Deepest element nesting read.
pub const MAX_DEPTH: usize = 32;
/// Longest container or instance id kept (characters after decoding).
pub const MAX_ID_LEN: usize = 256;

/// Why a document is not well-formed enough to read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XmlError {
    /// Not UTF-8.
    NotText,
    /// The document ends inside markup or with elements open.
    Truncated,
    /// Deeper than [`MAX_DEPTH`].
    TooDeep,
    /// A document type declaration (refused: entity definitions live there).
    Doctype,
    /// Broken markup; the text says what.
    Malformed(&'static str),
}

impl fmt::Display for XmlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            XmlError::NotText => f.write_str("XML is not UTF-8"),
            XmlError::Truncated => f.write_str("XML truncated"),
            XmlError::TooDeep => f.write_str("XML nested too deeply"),
            XmlError::Doctype => f.write_str("XML with a document type declaration"),
            XmlError::Malformed(what) => write!(f, "malformed XML: {what}"),
        }
    }
}

/// One piece of a document.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Token<'a> {
    /// `<name ...>`
    Start(&'a str),
    /// `</name>`
    End(&'a str),
    /// `<name .../>`
    Empty(&'a str),
    /// Character data, still escaped (decode with [`unescape`]).
    Text(&'a str),
    /// The inside of a CDATA section (literal).
    CData(&'a str),
}

/// A pull tokenizer over a complete document. See the [module docs](self).
#[derive(Debug)]
pub struct XmlReader<'a> {
    text: &'a str,
    pos: usize,
}

fn is_name_start(c: char) -> bool {
    c.is_ascii_alphabetic() || c == '_' || c == ':' || !c.is_ascii()
}

fn is_name_char(c: char) -> bool {
    is_name_start(c) || c.is_ascii_digit() || c == '-' || c == '.'
}

fn check_name(name: &str) -> Result<&str, XmlError> {
    let mut chars = name.chars();
    match chars.next() {
        Some(c) if is_name_start(c) && chars.all(is_name_char) => Ok(name),
        _ => Err(XmlError::Malformed("bad element name")),
    }
}

impl<'a> XmlReader<'a> {
    /// A reader over `bytes`, which must be UTF-8.
    pub fn new(bytes: &'a [u8]) -> Result<Self, XmlError> {
        let text = core::str::from_utf8(bytes).map_err(|_| XmlError::NotText)?;
        Ok(XmlReader { text, pos: 0 })
    }

    fn rest(&self) -> &'a str {
        self.text.get(self.pos..).unwrap_or("")
    }

    /// Skips past `end`, which must follow.
    fn skip_past(&mut self, end: &str) -> Result<&'a str, XmlError> {
        let rest = self.rest();
        let at = rest.find(end).ok_or(XmlError::Truncated)?;
        self.pos += at + end.len();
        Ok(&rest[..at])
    }

    /// The next token, `None` at the end of the input.
    pub fn next_token(&mut self) -> Result<Option<Token<'a>>, XmlError> {
        loop {
            let rest = self.rest();
            if rest.is_empty() {
                return Ok(None);
            }
            if !rest.starts_with('<') {
                let end = rest.find('<').unwrap_or(rest.len());
                self.pos += end;
                return Ok(Some(Token::Text(&rest[..end])));
            }
            if rest.starts_with("<?") {
                self.skip_past("?>")?;
                continue;
            }
            if rest.starts_with("<!--") {
                self.pos += 4;
                self.skip_past("-->")?;
                continue;
            }
            if rest.starts_with("<![CDATA[") {
                self.pos += 9;
                return Ok(Some(Token::CData(self.skip_past("]]>")?)));
            }
            if rest.starts_with("<!") {
                return Err(XmlError::Doctype);
            }
            if let Some(after) = rest.strip_prefix("</") {
                let end = after.find('>').ok_or(XmlError::Truncated)?;
                let name = check_name(after[..end].trim_end())?;
                self.pos += 2 + end + 1;
                return Ok(Some(Token::End(name)));
            }
            return self.start_tag().map(Some);
        }
    }

    /// `<name attr="v" ...>` or `.../>`; attributes are skipped (quotes respected).
    fn start_tag(&mut self) -> Result<Token<'a>, XmlError> {
        let rest = self.rest();
        let body = &rest[1..];
        let name_end = body
            .find(|c: char| c.is_ascii_whitespace() || c == '/' || c == '>')
            .ok_or(XmlError::Truncated)?;
        let name = check_name(&body[..name_end])?;
        let mut quote = None;
        let mut prev = '\0';
        for (i, c) in body[name_end..].char_indices() {
            match (quote, c) {
                (Some(q), c) if c == q => quote = None,
                (Some(_), '<') => return Err(XmlError::Malformed("'<' in an attribute")),
                (Some(_), _) => {}
                (None, '"' | '\'') => quote = Some(c),
                (None, '<') => return Err(XmlError::Malformed("'<' in a tag")),
                (None, '>') => {
                    self.pos += 1 + name_end + i + 1;
                    return Ok(if prev == '/' {
                        Token::Empty(name)
                    } else {
                        Token::Start(name)
                    });
                }
                (None, _) => {}
            }
            prev = c;
        }
        Err(XmlError::Truncated)
    }
}

/// Appends the decoded form of escaped character data to `out`, refusing to grow it past
/// `limit` bytes. Knows the five predefined entities and character references.
pub fn unescape(text: &str, out: &mut String, limit: usize) -> Result<(), XmlError> {
    let mut rest = text;
    while let Some(amp) = rest.find('&') {
        push_bounded(out, &rest[..amp], limit)?;
        let after = &rest[amp + 1..];
        let semi = after
            .find(';')
            .filter(|&s| s <= 10)
            .ok_or(XmlError::Malformed("unterminated entity"))?;
        let entity = &after[..semi];
        let c = match entity {
            "lt" => '<',
            "gt" => '>',
            "amp" => '&',
            "quot" => '"',
            "apos" => '\'',
            _ => {
                let number = if let Some(hex) = entity
                    .strip_prefix("#x")
                    .or_else(|| entity.strip_prefix("#X"))
                {
                    u32::from_str_radix(hex, 16).ok()
                } else if let Some(dec) = entity.strip_prefix('#') {
                    dec.parse::<u32>().ok()
                } else {
                    None
                };
                number
                    .and_then(char::from_u32)
                    .filter(|&c| c != '\0')
                    .ok_or(XmlError::Malformed("unknown entity"))?
            }
        };
        let mut buf = [0u8; 4];
        push_bounded(out, c.encode_utf8(&mut buf), limit)?;
        rest = &after[semi + 1..];
    }
    push_bounded(out, rest, limit)
}

fn push_bounded(out: &mut String, text: &str, limit: usize) -> Result<(), XmlError> {
    if out.len() + text.len() > limit {
        return Err(XmlError::Malformed("value too long"));
    }
    out.push_str(text);
    Ok(())
}

/// Appends `text` to `out` with `&`, `<`, `>`, `"` and `'` escaped, and control
/// characters XML 1.0 cannot carry dropped.
pub fn escape_xml(out: &mut String, text: &str) {
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            '\t' | '\n' | '\r' => out.push(c),
            c if (c as u32) < 0x20 => {}
            c => out.push(c),
        }
    }
}

/// What the agent needs from the goal state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GoalState {
    /// `GoalState/Incarnation`.
    pub incarnation: u64,
    /// `GoalState/Container/ContainerId`.
    pub container_id: String,
    /// The first `GoalState/Container/RoleInstanceList/RoleInstance/InstanceId`.
    pub instance_id: String,
}

/// Why a goal state was not usable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GoalStateError {
    /// The XML itself is broken.
    Xml(XmlError),
    /// The root element is not `GoalState`.
    NotGoalState,
    /// A field is missing (its name).
    Missing(&'static str),
    /// `Incarnation` is not a decimal number.
    BadIncarnation,
    /// An id is empty, too long or has control characters (its name).
    BadId(&'static str),
}

impl From<XmlError> for GoalStateError {
    fn from(error: XmlError) -> Self {
        GoalStateError::Xml(error)
    }
}

impl fmt::Display for GoalStateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GoalStateError::Xml(error) => write!(f, "goal state: {error}"),
            GoalStateError::NotGoalState => f.write_str("not a goal state document"),
            GoalStateError::Missing(what) => write!(f, "goal state without {what}"),
            GoalStateError::BadIncarnation => f.write_str("goal state incarnation not a number"),
            GoalStateError::BadId(what) => write!(f, "goal state with an unusable {what}"),
        }
    }
}

const INCARNATION: &[&str] = &["GoalState", "Incarnation"];
const CONTAINER_ID: &[&str] = &["GoalState", "Container", "ContainerId"];
const INSTANCE_ID: &[&str] = &[
    "GoalState",
    "Container",
    "RoleInstanceList",
    "RoleInstance",
    "InstanceId",
];

/// Reads the goal state fields out of `xml`. See the [module docs](self).
pub fn parse_goal_state(xml: &[u8]) -> Result<GoalState, GoalStateError> {
    let mut reader = XmlReader::new(xml)?;
    let mut stack: Vec<&str> = Vec::new();
    let wanted = [INCARNATION, CONTAINER_ID, INSTANCE_ID];
    // Per wanted path: the text so far, and whether its first element has ended.
    let mut values: [(Option<String>, bool); 3] = [(None, false), (None, false), (None, false)];
    let mut seen_root = false;
    while let Some(token) = reader.next_token()? {
        match token {
            Token::Start(name) | Token::Empty(name) => {
                if stack.is_empty() {
                    if seen_root {
                        return Err(XmlError::Malformed("content after the root element").into());
                    }
                    seen_root = true;
                    if name != "GoalState" {
                        return Err(GoalStateError::NotGoalState);
                    }
                }
                if stack.len() >= MAX_DEPTH {
                    return Err(XmlError::TooDeep.into());
                }
                stack.push(name);
                for (path, (value, done)) in wanted.iter().zip(values.iter_mut()) {
                    if !*done && stack.as_slice() == *path {
                        value.get_or_insert_with(String::new);
                    }
                }
                if let Token::Empty(_) = token {
                    end_element(&mut stack, &wanted, &mut values, name)?;
                }
            }
            Token::End(name) => end_element(&mut stack, &wanted, &mut values, name)?,
            Token::Text(text) | Token::CData(text) => {
                if stack.is_empty() {
                    if !text.trim().is_empty() || matches!(token, Token::CData(_)) {
                        return Err(XmlError::Malformed("text outside the root element").into());
                    }
                    continue;
                }
                for (path, (value, done)) in wanted.iter().zip(values.iter_mut()) {
                    if let (Some(value), false) = (value.as_mut(), *done) {
                        if stack.as_slice() == *path {
                            match token {
                                Token::CData(raw) => push_bounded(value, raw, MAX_ID_LEN * 4)?,
                                _ => unescape(text, value, MAX_ID_LEN * 4)?,
                            }
                        }
                    }
                }
            }
        }
    }
    if !stack.is_empty() || !seen_root {
        return Err(XmlError::Truncated.into());
    }
    let [incarnation, container, instance] = values.map(|(value, _)| value);
    let incarnation = incarnation.ok_or(GoalStateError::Missing("Incarnation"))?;
    let incarnation = incarnation.trim();
    if incarnation.is_empty()
        || incarnation.len() > 19
        || !incarnation.bytes().all(|b| b.is_ascii_digit())
    {
        return Err(GoalStateError::BadIncarnation);
    }
    let incarnation = incarnation
        .parse()
        .map_err(|_| GoalStateError::BadIncarnation)?;
    let container_id = check_id(container, "ContainerId")?;
    let instance_id = check_id(instance, "InstanceId")?;
    Ok(GoalState {
        incarnation,
        container_id,
        instance_id,
    })
}

fn end_element(
    stack: &mut Vec<&str>,
    wanted: &[&[&str]; 3],
    values: &mut [(Option<String>, bool); 3],
    name: &str,
) -> Result<(), GoalStateError> {
    if stack.last() != Some(&name) {
        return Err(XmlError::Malformed("end tag does not match").into());
    }
    for (path, (value, done)) in wanted.iter().zip(values.iter_mut()) {
        if value.is_some() && stack.as_slice() == *path {
            *done = true;
        }
    }
    stack.pop();
    Ok(())
}

fn check_id(value: Option<String>, what: &'static str) -> Result<String, GoalStateError> {
    let value = value.ok_or(GoalStateError::Missing(what))?;
    let trimmed = value.trim();
    if trimmed.is_empty()
        || trimmed.chars().count() > MAX_ID_LEN
        || trimmed.chars().any(char::is_control)
    {
        return Err(GoalStateError::BadId(what));
    }
    Ok(String::from(trimmed))
}

/// The goal state request.
pub fn goal_state_request(wireserver: Ipv4Addr, agent_name: &str) -> Vec<u8> {
    encode_request(
        "GET",
        wireserver,
        GOAL_STATE_PATH,
        &[
            ("x-ms-agent-name", agent_name),
            ("x-ms-version", WIRESERVER_VERSION),
        ],
        b"",
    )
}

/// The `Health` document reporting `state` (e.g. `Ready`) for `goal`, every value
/// escaped.
pub fn health_report_xml(goal: &GoalState, state: &str) -> String {
    let mut xml = String::from(
        "<?xml version=\"1.0\" encoding=\"utf-8\"?>\n<Health xmlns:xsi=\"http://www.w3.org/2001/XMLSchema-instance\" xmlns:xsd=\"http://www.w3.org/2001/XMLSchema\">\n  <GoalStateIncarnation>",
    );
    let _ = write!(xml, "{}", goal.incarnation);
    xml.push_str("</GoalStateIncarnation>\n  <Container>\n    <ContainerId>");
    escape_xml(&mut xml, &goal.container_id);
    xml.push_str("</ContainerId>\n    <RoleInstanceList>\n      <Role>\n        <InstanceId>");
    escape_xml(&mut xml, &goal.instance_id);
    xml.push_str("</InstanceId>\n        <Health>\n          <State>");
    escape_xml(&mut xml, state);
    xml.push_str(
        "</State>\n        </Health>\n      </Role>\n    </RoleInstanceList>\n  </Container>\n</Health>\n",
    );
    xml
}

/// The health report request carrying `xml`.
pub fn health_request(wireserver: Ipv4Addr, agent_name: &str, xml: &str) -> Vec<u8> {
    encode_request(
        "POST",
        wireserver,
        HEALTH_PATH,
        &[
            ("x-ms-agent-name", agent_name),
            ("x-ms-version", WIRESERVER_VERSION),
            ("Content-Type", HEALTH_CONTENT_TYPE),
        ],
        xml.as_bytes(),
    )
}

/// Whether the WireServer took a health report with this status.
pub fn report_accepted(status: u16) -> bool {
    matches!(status, 200..=202)
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::format;

    pub(crate) const GOAL_STATE: &str = r#"<?xml version="1.0" encoding="utf-8"?>
<GoalState xmlns:i="http://www.w3.org/2001/XMLSchema-instance" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" xsi:noNamespaceSchemaLocation="goalstate10.xsd">
  <Version>2015-04-05</Version>
  <Incarnation>7</Incarnation>
  <Machine>
    <ExpectedState>Started</ExpectedState>
    <StopRolesDeadlineHint>300000</StopRolesDeadlineHint>
    <LBProbePorts><Port>16001</Port></LBProbePorts>
    <ExpectHealthReport>FALSE</ExpectHealthReport>
  </Machine>
  <!-- <Incarnation>99</Incarnation> in a comment is not the incarnation -->
  <Container>
    <ContainerId>3ab7c1e2-5d0f-4b8a-9e61-2c4f8d7a9b10</ContainerId>
    <RoleInstanceList>
      <RoleInstance>
        <InstanceId>a5d8e4f1-0c2b-4e7a-8f3d-6b9c1e2a4d57.hv&amp;net_&lt;0&gt;</InstanceId>
        <State>Started</State>
        <Configuration>
          <HostingEnvironmentConfig>http://168.63.129.16:80/machine/x?comp=config&amp;type=hostingEnvironmentConfig&amp;incarnation=7</HostingEnvironmentConfig>
          <ConfigName>a5d8e4f1.0.a5d8e4f1.1.hvnet.7.xml</ConfigName>
        </Configuration>
      </RoleInstance>
      <RoleInstance>
        <InstanceId>second-instance</InstanceId>
      </RoleInstance>
    </RoleInstanceList>
  </Container>
</GoalState>
"#;

    #[test]
    fn a_goal_state_is_read() {
        let goal = parse_goal_state(GOAL_STATE.as_bytes()).unwrap();
        assert_eq!(goal.incarnation, 7);
        assert_eq!(goal.container_id, "3ab7c1e2-5d0f-4b8a-9e61-2c4f8d7a9b10");
        assert_eq!(
            goal.instance_id,
            "a5d8e4f1-0c2b-4e7a-8f3d-6b9c1e2a4d57.hv&net_<0>"
        );
        let cdata = "<GoalState><Incarnation><![CDATA[12]]></Incarnation><Container>\
                     <ContainerId>c</ContainerId><RoleInstanceList><RoleInstance>\
                     <InstanceId attr='x>y'>i&#x41;&#66;</InstanceId></RoleInstance>\
                     </RoleInstanceList></Container></GoalState>";
        let goal = parse_goal_state(cdata.as_bytes()).unwrap();
        assert_eq!((goal.incarnation, goal.instance_id.as_str()), (12, "iAB"));
    }

    #[test]
    fn broken_goal_states_are_refused() {
        let cases: &[(&str, GoalStateError)] = &[
            ("", GoalStateError::Xml(XmlError::Truncated)),
            ("<html><body>oops</body></html>", GoalStateError::NotGoalState),
            ("<GoalState><Incarnation>1</Incarnation>", GoalStateError::Xml(XmlError::Truncated)),
            ("<GoalState></Goal>", GoalStateError::Xml(XmlError::Malformed("end tag does not match"))),
            ("<!DOCTYPE x [<!ENTITY a 'b'>]><GoalState/>", GoalStateError::Xml(XmlError::Doctype)),
            ("<GoalState/>", GoalStateError::Missing("Incarnation")),
            ("<GoalState><Incarnation>-1</Incarnation></GoalState>", GoalStateError::BadIncarnation),
            ("<GoalState><Incarnation>1</Incarnation></GoalState>", GoalStateError::Missing("ContainerId")),
            (
                "<GoalState><Incarnation>1</Incarnation><Container><ContainerId> </ContainerId></Container></GoalState>",
                GoalStateError::BadId("ContainerId"),
            ),
            (
                "<GoalState><Incarnation>1&bogus;</Incarnation></GoalState>",
                GoalStateError::Xml(XmlError::Malformed("unknown entity")),
            ),
            ("<GoalState/><GoalState/>", GoalStateError::Xml(XmlError::Malformed("content after the root element"))),
            ("<GoalState a=\"<\"/>", GoalStateError::Xml(XmlError::Malformed("'<' in an attribute"))),
            ("<1GoalState/>", GoalStateError::Xml(XmlError::Malformed("bad element name"))),
        ];
        for (xml, expected) in cases {
            assert_eq!(parse_goal_state(xml.as_bytes()), Err(*expected), "{xml}");
        }
        assert_eq!(
            parse_goal_state(b"<GoalState>\xff</GoalState>"),
            Err(GoalStateError::Xml(XmlError::NotText))
        );
        let deep = format!("<GoalState>{}", "<a>".repeat(MAX_DEPTH + 5));
        assert_eq!(
            parse_goal_state(deep.as_bytes()),
            Err(GoalStateError::Xml(XmlError::TooDeep))
        );
        let long = format!(
            "<GoalState><Incarnation>1</Incarnation><Container><ContainerId>{}</ContainerId></Container></GoalState>",
            "x".repeat(MAX_ID_LEN * 5)
        );
        assert!(parse_goal_state(long.as_bytes()).is_err());
    }

    #[test]
    fn truncations_and_bit_flips_never_panic() {
        let sample = GOAL_STATE.as_bytes();
        let end = GOAL_STATE.rfind("</GoalState>").unwrap() + "</GoalState>".len();
        for cut in 0..end {
            // A cut goal state is never taken for a whole one.
            assert!(parse_goal_state(&sample[..cut]).is_err(), "cut at {cut}");
        }
        crate::azure::bit_flips(sample, 3, 20_000, |bytes, _| {
            if let Ok(goal) = parse_goal_state(bytes) {
                assert!(goal.container_id.chars().count() <= MAX_ID_LEN);
                assert!(!goal.instance_id.is_empty());
            }
        });
    }

    #[test]
    fn the_health_report_escapes_what_it_carries() {
        let goal = GoalState {
            incarnation: 3,
            container_id: "c<&>\"'".into(),
            instance_id: "i\u{1}d".into(),
        };
        let xml = health_report_xml(&goal, "Ready");
        assert!(xml.contains("<GoalStateIncarnation>3</GoalStateIncarnation>"));
        assert!(xml.contains("<ContainerId>c&lt;&amp;&gt;&quot;&apos;</ContainerId>"));
        assert!(xml.contains("<InstanceId>id</InstanceId>"));
        assert!(xml.contains("<State>Ready</State>"));
        // It reads back with the same reader.
        let mut reader = XmlReader::new(xml.as_bytes()).unwrap();
        let mut depth = 0i32;
        while let Some(token) = reader.next_token().unwrap() {
            match token {
                Token::Start(_) => depth += 1,
                Token::End(_) => depth -= 1,
                _ => {}
            }
        }
        assert_eq!(depth, 0);
        let request = health_request(Ipv4Addr::new(168, 63, 129, 16), "hvnet", &xml);
        let text = core::str::from_utf8(&request).unwrap();
        assert!(text.starts_with("POST /machine?comp=health HTTP/1.1\r\n"));
        assert!(text.contains("\r\nx-ms-version: 2012-11-30\r\n"));
        assert!(text.contains("\r\nx-ms-agent-name: hvnet\r\n"));
        assert!(text.contains("\r\nContent-Type: text/xml;charset=utf-8\r\n"));
        assert!(text.ends_with(&xml));
        let get = goal_state_request(Ipv4Addr::new(168, 63, 129, 16), "hvnet");
        assert!(core::str::from_utf8(&get)
            .unwrap()
            .starts_with("GET /machine/?comp=goalstate HTTP/1.1\r\n"));
        assert!(report_accepted(202) && !report_accepted(204) && !report_accepted(500));
    }
}
