//! Classification of a client into a device class from its `User-Agent` and
//! the `Sec-CH-UA-Mobile` client hint.
//!
//! The checks run in this order, and the first that matches decides:
//!
//! 1. bot: crawlers, link-preview fetchers, headless browsers and
//!    command-line or library HTTP clients (curl, Wget, python-requests,
//!    Go-http-client and the like), because a crawler may claim a phone or
//!    desktop browser in the rest of its `User-Agent`;
//! 2. mobile when `Sec-CH-UA-Mobile` is `?1` (Chromium sends it on every
//!    request; `?0` decides nothing, so tablets fall through);
//! 3. mobile for handheld consoles (PlayStation Vita, Nintendo 3DS);
//! 4. tv: smart TVs, streaming devices and game consoles that plug into a
//!    TV (PlayStation 4 and 5, Xbox, Nintendo Switch, whose browser runs
//!    docked or handheld but is built for a controller);
//! 5. tablet: iPad, Kindle and Fire tablets, `Tablet` tokens;
//! 6. mobile: `Mobi` anywhere (as MDN recommends), iPhone, iPod, Windows
//!    Phone, BlackBerry, Opera Mini, KaiOS;
//! 7. tablet: any other Android device, because Android phones' browsers
//!    send `Mobile` and tablets' do not;
//! 8. desktop: Windows, macOS, Linux, ChromeOS (an X11 platform) and the
//!    BSDs.
//!
//! Anything else, including a missing or empty `User-Agent`, is unknown and
//! gets the configured default class. iPadOS Safari requests desktop sites
//! by default and then sends the same `User-Agent` as Safari on macOS, so such
//! an iPad is classified desktop, which is the site Apple chose for it.

use serde::Deserialize;

/// The class of client device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceClass {
    Mobile,
    Tablet,
    Desktop,
    Tv,
    Bot,
}

impl DeviceClass {
    /// Every class, in the order of the docs.
    pub const ALL: [DeviceClass; 5] = [
        DeviceClass::Mobile,
        DeviceClass::Tablet,
        DeviceClass::Desktop,
        DeviceClass::Tv,
        DeviceClass::Bot,
    ];

    /// Returns the name used in config and in the `X-Device-Class` header.
    pub fn as_str(self) -> &'static str {
        match self {
            DeviceClass::Mobile => "mobile",
            DeviceClass::Tablet => "tablet",
            DeviceClass::Desktop => "desktop",
            DeviceClass::Tv => "tv",
            DeviceClass::Bot => "bot",
        }
    }
}

/// Words that end in "bot" but name a phone maker, not a crawler.
const NOT_BOTS: &[&str] = &["cubot"];

/// Crawlers and fetchers whose names do not end in bot, spider or crawler.
const BOT_MARKERS: &[&str] = &[
    "+http",
    "slurp",
    "facebookexternalhit",
    "facebookcatalog",
    "mediapartners-google",
    "apis-google",
    "feedfetcher",
    "google-inspectiontool",
    "googleother",
    "ia_archiver",
    "embedly",
    "skypeuripreview",
    "headlesschrome",
    "chrome-lighthouse",
    "phantomjs",
    "powershell/",
];

/// The product names (the `User-Agent`'s first token, before `/`) of
/// command-line tools and HTTP libraries.
const HTTP_TOOLS: &[&str] = &[
    "curl",
    "wget",
    "httpie",
    "python-requests",
    "python-urllib",
    "python-httpx",
    "aiohttp",
    "go-http-client",
    "java",
    "apache-httpclient",
    "libwww-perl",
    "node-fetch",
    "axios",
    "undici",
    "postmanruntime",
    "insomnia",
    "ruby",
    "faraday",
    "guzzlehttp",
    "whatsapp",
];

const HANDHELD_CONSOLES: &[&str] = &["playstation vita", "playstation portable", "nintendo 3ds"];

const TV_MARKERS: &[&str] = &[
    "smart-tv",
    "smarttv",
    "smart tv",
    "googletv",
    "google tv",
    "android tv",
    "web0s",
    "webos",
    "netcast",
    "hbbtv",
    "appletv",
    "apple tv",
    "crkey",
    "chromecast",
    "bravia",
    "aquos",
    "viera",
    "philipstv",
    "nettv",
    "mibox",
    "vidaa",
    "tv safari",
    "xbox",
    "playstation 4",
    "playstation 5",
    "(playstation;",
    "nintendo switch",
    "nintendo wiiu",
];

const TABLET_MARKERS: &[&str] = &["ipad", "kindle", "silk/", "playbook"];

const MOBILE_MARKERS: &[&str] = &[
    "mobi",
    "iphone",
    "ipod",
    "windows phone",
    "blackberry",
    "bb10",
    "opera mini",
    "kaios",
];

const DESKTOP_MARKERS: &[&str] = &[
    "windows nt",
    "macintosh",
    "mac os x",
    "x11",
    "linux",
    "freebsd",
    "openbsd",
];

/// Classifies a client, or returns `None` when the `User-Agent` is missing
/// or matches no class.
pub fn classify(user_agent: Option<&str>, mobile_hint: Option<&str>) -> Option<DeviceClass> {
    let user_agent = user_agent
        .map(|ua| ua.trim().to_ascii_lowercase())
        .filter(|ua| !ua.is_empty());
    if user_agent.as_deref().is_some_and(is_bot) {
        return Some(DeviceClass::Bot);
    }
    if mobile_hint.is_some_and(|hint| hint.trim() == "?1") {
        return Some(DeviceClass::Mobile);
    }
    let ua = user_agent?;
    let has = |markers: &[&str]| markers.iter().any(|marker| ua.contains(marker));
    if has(HANDHELD_CONSOLES) {
        return Some(DeviceClass::Mobile);
    }
    if has(TV_MARKERS) || has_word(&ua, "roku") || has_android_model(&ua, "aft") {
        return Some(DeviceClass::Tv);
    }
    if has(TABLET_MARKERS) || has_android_model(&ua, "kf") || has_tablet_token(&ua) {
        return Some(DeviceClass::Tablet);
    }
    if has(MOBILE_MARKERS) {
        return Some(DeviceClass::Mobile);
    }
    if ua.contains("android") {
        return Some(DeviceClass::Tablet);
    }
    if has(DESKTOP_MARKERS) {
        return Some(DeviceClass::Desktop);
    }
    None
}

/// Returns whether the lower-case `ua` is a crawler or an HTTP tool.
fn is_bot(ua: &str) -> bool {
    let named_bot = words(ua).any(|word| {
        (word.ends_with("bot") && !NOT_BOTS.contains(&word))
            || word.ends_with("spider")
            || word.ends_with("crawler")
    });
    if named_bot || BOT_MARKERS.iter().any(|marker| ua.contains(marker)) {
        return true;
    }
    let product = ua.split(['/', ' ', ';', '(']).next().unwrap_or_default();
    HTTP_TOOLS.contains(&product)
}

/// Splits the lower-case `ua` into runs of ASCII letters and digits.
fn words(ua: &str) -> impl Iterator<Item = &str> {
    ua.split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|word| !word.is_empty())
}

fn has_word(ua: &str, wanted: &str) -> bool {
    words(ua).any(|word| word == wanted)
}

/// Returns whether an item of the `User-Agent`'s comments (the text in
/// brackets, split at `;`) starts with a model code of `prefix` and
/// letters, such as Amazon's `AFTKA` (a Fire TV) or `KFTRWI` (a Fire
/// tablet).
fn has_android_model(ua: &str, prefix: &str) -> bool {
    comment_items(ua).any(|item| {
        let model = item.split(' ').next().unwrap_or_default();
        model.len() > prefix.len()
            && model.len() <= 8
            && model.starts_with(prefix)
            && model.bytes().all(|byte| byte.is_ascii_alphabetic())
    })
}

/// Returns whether a comment item is `tablet` or names a tablet, other than
/// `Tablet PC`, which Windows added to the `User-Agent` of ordinary PCs.
fn has_tablet_token(ua: &str) -> bool {
    comment_items(ua).any(|item| item.contains("tablet") && !item.contains("tablet pc"))
}

/// Returns the `;`-separated items inside the brackets of the lower-case `ua`.
fn comment_items(ua: &str) -> impl Iterator<Item = &str> {
    ua.split('(')
        .skip(1)
        .filter_map(|rest| rest.split(')').next())
        .flat_map(|comment| comment.split(';'))
        .map(str::trim)
}

#[cfg(test)]
mod tests;
