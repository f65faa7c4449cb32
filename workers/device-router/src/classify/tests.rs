//! A table of real `User-Agent` strings and the class each gets.

use super::DeviceClass::{Bot, Desktop, Mobile, Tablet, Tv};
use super::*;

/// (what the client is, its `User-Agent`, the expected class).
const USER_AGENTS: &[(&str, &str, DeviceClass)] = &[
    // Desktop browsers on Windows, macOS, Linux and ChromeOS.
    (
        "Chrome on Windows",
        "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) \
         Chrome/131.0.0.0 Safari/537.36",
        Desktop,
    ),
    (
        "Edge on Windows",
        "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) \
         Chrome/131.0.0.0 Safari/537.36 Edg/131.0.0.0",
        Desktop,
    ),
    (
        "Firefox on Windows",
        "Mozilla/5.0 (Windows NT 10.0; Win64; x64; rv:133.0) Gecko/20100101 Firefox/133.0",
        Desktop,
    ),
    (
        "Opera on Windows",
        "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) \
         Chrome/130.0.0.0 Safari/537.36 OPR/115.0.0.0",
        Desktop,
    ),
    (
        "Yandex Browser on Windows",
        "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) \
         Chrome/124.0.0.0 YaBrowser/24.6.0.0 Safari/537.36",
        Desktop,
    ),
    (
        "Internet Explorer 11 on a Tablet PC",
        "Mozilla/5.0 (Windows NT 6.1; WOW64; Trident/7.0; SLCC2; .NET CLR 2.0.50727; \
         Tablet PC 2.0; rv:11.0) like Gecko",
        Desktop,
    ),
    (
        "Chrome on macOS",
        "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/537.36 (KHTML, like Gecko) \
         Chrome/131.0.0.0 Safari/537.36",
        Desktop,
    ),
    (
        "Safari on macOS",
        "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like \
         Gecko) Version/18.1 Safari/605.1.15",
        Desktop,
    ),
    (
        "Firefox on macOS",
        "Mozilla/5.0 (Macintosh; Intel Mac OS X 10.15; rv:133.0) Gecko/20100101 Firefox/133.0",
        Desktop,
    ),
    (
        "Edge on macOS",
        "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/537.36 (KHTML, like Gecko) \
         Chrome/131.0.0.0 Safari/537.36 Edg/131.0.0.0",
        Desktop,
    ),
    (
        "Chrome on Linux",
        "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) \
         Chrome/131.0.0.0 Safari/537.36",
        Desktop,
    ),
    (
        "Firefox on Linux",
        "Mozilla/5.0 (X11; Linux x86_64; rv:133.0) Gecko/20100101 Firefox/133.0",
        Desktop,
    ),
    (
        "Firefox on Ubuntu",
        "Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:133.0) Gecko/20100101 Firefox/133.0",
        Desktop,
    ),
    (
        "Chrome on ChromeOS",
        "Mozilla/5.0 (X11; CrOS x86_64 14541.0.0) AppleWebKit/537.36 (KHTML, like Gecko) \
         Chrome/131.0.0.0 Safari/537.36",
        Desktop,
    ),
    (
        // iPadOS Safari requests desktop sites by default and then sends
        // exactly the macOS Safari string: classified desktop.
        "Safari on iPadOS in desktop mode",
        "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like \
         Gecko) Version/17.4 Safari/605.1.15",
        Desktop,
    ),
    // Phones.
    (
        "Safari on iPhone",
        "Mozilla/5.0 (iPhone; CPU iPhone OS 18_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, \
         like Gecko) Version/18.1 Mobile/15E148 Safari/604.1",
        Mobile,
    ),
    (
        "Chrome on iPhone",
        "Mozilla/5.0 (iPhone; CPU iPhone OS 17_7 like Mac OS X) AppleWebKit/605.1.15 (KHTML, \
         like Gecko) CriOS/131.0.6778.73 Mobile/15E148 Safari/604.1",
        Mobile,
    ),
    (
        "Firefox on iPhone",
        "Mozilla/5.0 (iPhone; CPU iPhone OS 17_7 like Mac OS X) AppleWebKit/605.1.15 (KHTML, \
         like Gecko) FxiOS/133.0 Mobile/15E148 Safari/605.1.15",
        Mobile,
    ),
    (
        "Edge on iPhone",
        "Mozilla/5.0 (iPhone; CPU iPhone OS 17_7 like Mac OS X) AppleWebKit/605.1.15 (KHTML, \
         like Gecko) Version/17.0 EdgiOS/131.0.2903.68 Mobile/15E148 Safari/604.1",
        Mobile,
    ),
    (
        "Instagram's in-app browser on iPhone",
        "Mozilla/5.0 (iPhone; CPU iPhone OS 17_6_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, \
         like Gecko) Mobile/15E148 Instagram 352.0.0.30.76 (iPhone15,3; iOS 17_6_1; en_US; en; \
         scale=3.00; 1290x2796; 647436046)",
        Mobile,
    ),
    (
        "Safari on iPod touch",
        "Mozilla/5.0 (iPod touch; CPU iPhone OS 15_7 like Mac OS X) AppleWebKit/605.1.15 \
         (KHTML, like Gecko) Version/15.6 Mobile/15E148 Safari/604.1",
        Mobile,
    ),
    (
        "Chrome on Android with the reduced User-Agent",
        "Mozilla/5.0 (Linux; Android 10; K) AppleWebKit/537.36 (KHTML, like Gecko) \
         Chrome/131.0.0.0 Mobile Safari/537.36",
        Mobile,
    ),
    (
        "Chrome on a Pixel 8 Pro",
        "Mozilla/5.0 (Linux; Android 14; Pixel 8 Pro) AppleWebKit/537.36 (KHTML, like Gecko) \
         Chrome/131.0.6778.81 Mobile Safari/537.36",
        Mobile,
    ),
    (
        "Samsung Internet on a Galaxy S24 Ultra",
        "Mozilla/5.0 (Linux; Android 14; SAMSUNG SM-S928B) AppleWebKit/537.36 (KHTML, like \
         Gecko) SamsungBrowser/27.0 Chrome/125.0.0.0 Mobile Safari/537.36",
        Mobile,
    ),
    (
        "Firefox on an Android phone",
        "Mozilla/5.0 (Android 15; Mobile; rv:133.0) Gecko/133.0 Firefox/133.0",
        Mobile,
    ),
    (
        "Edge on an Android phone",
        "Mozilla/5.0 (Linux; Android 10; K) AppleWebKit/537.36 (KHTML, like Gecko) \
         Chrome/131.0.0.0 Mobile Safari/537.36 EdgA/131.0.0.0",
        Mobile,
    ),
    (
        "Android WebView on a Galaxy A53",
        "Mozilla/5.0 (Linux; Android 13; SM-A536B Build/TP1A.220624.014; wv) AppleWebKit/537.36 \
         (KHTML, like Gecko) Version/4.0 Chrome/131.0.6778.39 Mobile Safari/537.36",
        Mobile,
    ),
    (
        "MIUI Browser on a Xiaomi phone",
        "Mozilla/5.0 (Linux; U; Android 13; en-us; 2201117TG Build/TKQ1.221114.001) \
         AppleWebKit/537.36 (KHTML, like Gecko) Version/4.0 Chrome/112.0.5615.136 Mobile \
         Safari/537.36 XiaoMi/MiuiBrowser/14.11.0-gn",
        Mobile,
    ),
    (
        "UC Browser on a Realme phone",
        "Mozilla/5.0 (Linux; U; Android 11; en-US; RMX2193 Build/RP1A.201005.001) \
         AppleWebKit/537.36 (KHTML, like Gecko) Version/4.0 Chrome/100.0.4896.58 \
         UCBrowser/13.6.0.1315 Mobile Safari/537.36",
        Mobile,
    ),
    (
        "Chrome on a Cubot phone, whose maker's name ends in bot",
        "Mozilla/5.0 (Linux; Android 9; CUBOT X19) AppleWebKit/537.36 (KHTML, like Gecko) \
         Chrome/96.0.4664.92 Mobile Safari/537.36",
        Mobile,
    ),
    (
        "Opera Mini on Android",
        "Opera/9.80 (Android; Opera Mini/36.2.2254/191.256; U; en) Presto/2.12.423 \
         Version/12.16",
        Mobile,
    ),
    (
        "KaiOS feature phone",
        "Mozilla/5.0 (Mobile; LYF/F300B/LYF-F300B-001-01-15-130718-i; Android; rv:48.0) \
         Gecko/48.0 Firefox/48.0 KAIOS/2.5",
        Mobile,
    ),
    (
        "Edge on Windows Phone",
        "Mozilla/5.0 (Windows Phone 10.0; Android 6.0.1; Microsoft; Lumia 950) \
         AppleWebKit/537.36 (KHTML, like Gecko) Chrome/52.0.2743.116 Mobile Safari/537.36 \
         Edge/15.15063",
        Mobile,
    ),
    (
        "BlackBerry 10",
        "Mozilla/5.0 (BB10; Touch) AppleWebKit/537.35+ (KHTML, like Gecko) \
         Version/10.3.3.2205 Mobile Safari/537.35+",
        Mobile,
    ),
    // Handheld consoles count as mobile.
    (
        "PlayStation Vita",
        "Mozilla/5.0 (PlayStation Vita 3.74) AppleWebKit/537.73 (KHTML, like Gecko) Silk/3.2",
        Mobile,
    ),
    (
        "New Nintendo 3DS",
        "Mozilla/5.0 (New Nintendo 3DS like iPhone) AppleWebKit/536.30 (KHTML, like Gecko) \
         NX/3.0.0.5.22 Mobile NintendoBrowser/1.10.10166.US",
        Mobile,
    ),
    // Tablets.
    (
        "Safari on iPad in mobile mode",
        "Mozilla/5.0 (iPad; CPU OS 17_7 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) \
         Version/17.4.1 Mobile/15E148 Safari/604.1",
        Tablet,
    ),
    (
        "Chrome on iPad",
        "Mozilla/5.0 (iPad; CPU OS 17_7 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) \
         CriOS/131.0.6778.73 Mobile/15E148 Safari/604.1",
        Tablet,
    ),
    (
        "Chrome on a Galaxy Tab S9",
        "Mozilla/5.0 (Linux; Android 14; SM-X710) AppleWebKit/537.36 (KHTML, like Gecko) \
         Chrome/131.0.0.0 Safari/537.36",
        Tablet,
    ),
    (
        "Chrome on an Android tablet with the reduced User-Agent",
        "Mozilla/5.0 (Linux; Android 10; K) AppleWebKit/537.36 (KHTML, like Gecko) \
         Chrome/131.0.0.0 Safari/537.36",
        Tablet,
    ),
    (
        "Samsung Internet on a Galaxy Tab S8",
        "Mozilla/5.0 (Linux; Android 13; SAMSUNG SM-X700) AppleWebKit/537.36 (KHTML, like \
         Gecko) SamsungBrowser/23.0 Chrome/115.0.0.0 Safari/537.36",
        Tablet,
    ),
    (
        "Firefox on an Android tablet",
        "Mozilla/5.0 (Android 14; Tablet; rv:133.0) Gecko/133.0 Firefox/133.0",
        Tablet,
    ),
    (
        "Chrome on a Lenovo Tab M10",
        "Mozilla/5.0 (Linux; Android 12; Lenovo TB-X606F) AppleWebKit/537.36 (KHTML, like \
         Gecko) Chrome/119.0.0.0 Safari/537.36",
        Tablet,
    ),
    (
        "Huawei Browser on a MatePad",
        "Mozilla/5.0 (Linux; Android 10; BAH3-W09; HMSCore 6.11.0.302) AppleWebKit/537.36 \
         (KHTML, like Gecko) Chrome/99.0.4844.88 HuaweiBrowser/14.0.0.322 Safari/537.36",
        Tablet,
    ),
    (
        "Silk on a Fire HD 10",
        "Mozilla/5.0 (Linux; Android 11; KFTRWI) AppleWebKit/537.36 (KHTML, like Gecko) \
         Silk/131.3.3 like Chrome/131.0.6778.135 Safari/537.36",
        Tablet,
    ),
    (
        "WebView on a Fire HD 8, which sends Mobile",
        "Mozilla/5.0 (Linux; Android 9; KFMAWI Build/PS7326.3183N; wv) AppleWebKit/537.36 \
         (KHTML, like Gecko) Version/4.0 Chrome/120.0.6099.230 Mobile Safari/537.36",
        Tablet,
    ),
    (
        "Kindle e-reader",
        "Mozilla/5.0 (X11; U; Linux armv7l like Android; en-us) AppleWebKit/531.2+ (KHTML, like \
         Gecko) Version/5.0 Safari/531.2+ Kindle/3.0+",
        Tablet,
    ),
    (
        "Kindle Paperwhite",
        "Mozilla/5.0 (Linux; U; en-US) AppleWebKit/528.5+ (KHTML, like Gecko, Safari/528.5+) \
         Version/4.0 Kindle/3.0 (screen 600x800; rotate)",
        Tablet,
    ),
    // Smart TVs and streaming devices.
    (
        "Samsung Tizen TV",
        "Mozilla/5.0 (SMART-TV; LINUX; Tizen 6.0) AppleWebKit/537.36 (KHTML, like Gecko) \
         76.0.3809.146/6.0 TV Safari/537.36",
        Tv,
    ),
    (
        "Samsung Tizen 7 TV",
        "Mozilla/5.0 (SMART-TV; Linux; Tizen 7.0) AppleWebKit/537.36 (KHTML, like Gecko) \
         94.0.4606.31/7.0 TV Safari/537.36",
        Tv,
    ),
    (
        "LG webOS TV",
        "Mozilla/5.0 (Web0S; Linux/SmartTV) AppleWebKit/537.36 (KHTML, like Gecko) \
         Chrome/87.0.4280.88 Safari/537.36 DMOST/2.0.0 (; LGE; webOSTV; WEBOS6.3.2 03.34.95; \
         W6_lm21a;)",
        Tv,
    ),
    (
        "Sony Bravia Android TV, which sends Mobile",
        "Mozilla/5.0 (Linux; Android 10; BRAVIA 4K GB ATV3 Build/QTG3.200305.006.S292; wv) \
         AppleWebKit/537.36 (KHTML, like Gecko) Version/4.0 Chrome/83.0.4103.101 Mobile \
         Safari/537.36",
        Tv,
    ),
    (
        "NVIDIA Shield Android TV",
        "Mozilla/5.0 (Linux; Android 11; SHIELD Android TV Build/RQ1A.210105.003; wv) \
         AppleWebKit/537.36 (KHTML, like Gecko) Version/4.0 Chrome/115.0.5790.166 Mobile \
         Safari/537.36",
        Tv,
    ),
    (
        "Chromecast with Google TV",
        "Mozilla/5.0 (Linux; Android 12; Chromecast Build/STTE.230319.008.R3; wv) \
         AppleWebKit/537.36 (KHTML, like Gecko) Version/4.0 Chrome/114.0.5735.196 Mobile \
         Safari/537.36",
        Tv,
    ),
    (
        "Chromecast receiver",
        "Mozilla/5.0 (X11; Linux armv7l) AppleWebKit/537.36 (KHTML, like Gecko) \
         Chrome/88.0.4324.152 Safari/537.36 CrKey/1.54.250320",
        Tv,
    ),
    (
        "Xiaomi Mi Box",
        "Mozilla/5.0 (Linux; Android 9; MIBOX4 Build/PI; wv) AppleWebKit/537.36 (KHTML, like \
         Gecko) Version/4.0 Chrome/108.0.5359.128 Mobile Safari/537.36",
        Tv,
    ),
    (
        "WebView on a Fire TV Stick",
        "Mozilla/5.0 (Linux; Android 9; AFTKA Build/PS7633.3445N; wv) AppleWebKit/537.36 (KHTML, \
         like Gecko) Version/4.0 Chrome/130.0.6723.102 Mobile Safari/537.36",
        Tv,
    ),
    (
        "Silk on a Fire TV Cube",
        "Mozilla/5.0 (Linux; Android 9; AFTSSS) AppleWebKit/537.36 (KHTML, like Gecko) \
         Silk/120.3.1 like Chrome/120.0.6099.230 Safari/537.36",
        Tv,
    ),
    ("Roku", "Roku/DVP-13.0 (13.0.0.4170-46)", Tv),
    (
        "Apple TV media player",
        "AppleCoreMedia/1.0.0.21K69 (Apple TV; U; CPU OS 17_1 like Mac OS X; en_us)",
        Tv,
    ),
    ("Apple TV app", "AppleTV11,1/11.1", Tv),
    // Game consoles that plug into a TV.
    (
        "PlayStation 5",
        "Mozilla/5.0 (PlayStation; PlayStation 5/2.26) AppleWebKit/605.1.15 (KHTML, like Gecko) \
         Version/13.0 Safari/605.1.15",
        Tv,
    ),
    (
        "PlayStation 4",
        "Mozilla/5.0 (PlayStation 4 11.00) AppleWebKit/605.1.15 (KHTML, like Gecko)",
        Tv,
    ),
    (
        "Xbox Series X",
        "Mozilla/5.0 (Windows NT 10.0; Win64; x64; Xbox; Xbox Series X) AppleWebKit/537.36 \
         (KHTML, like Gecko) Chrome/48.0.2564.82 Safari/537.36 Edge/20.02",
        Tv,
    ),
    (
        "Edge on Xbox One",
        "Mozilla/5.0 (Windows NT 10.0; Win64; x64; Xbox; Xbox One) AppleWebKit/537.36 (KHTML, \
         like Gecko) Chrome/131.0.0.0 Safari/537.36 Edg/131.0.2903.51",
        Tv,
    ),
    (
        "Nintendo Switch",
        "Mozilla/5.0 (Nintendo Switch; WifiWebAuthApplet) AppleWebKit/606.4 (KHTML, like Gecko) \
         NF/6.0.1.15.4 NintendoBrowser/5.1.0.20393",
        Tv,
    ),
    // Crawlers, fetchers and HTTP tools.
    (
        "Googlebot",
        "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)",
        Bot,
    ),
    (
        "Googlebot smartphone",
        "Mozilla/5.0 (Linux; Android 6.0.1; Nexus 5X Build/MMB29P) AppleWebKit/537.36 (KHTML, \
         like Gecko) Chrome/131.0.6778.69 Mobile Safari/537.36 (compatible; Googlebot/2.1; \
         +http://www.google.com/bot.html)",
        Bot,
    ),
    (
        "Googlebot desktop",
        "Mozilla/5.0 AppleWebKit/537.36 (KHTML, like Gecko; compatible; Googlebot/2.1; \
         +http://www.google.com/bot.html) Chrome/131.0.6778.69 Safari/537.36",
        Bot,
    ),
    (
        "Google Search Console inspection",
        "Mozilla/5.0 (compatible; Google-InspectionTool/1.0;)",
        Bot,
    ),
    ("Google AdSense", "Mediapartners-Google", Bot),
    (
        "Bingbot",
        "Mozilla/5.0 AppleWebKit/537.36 (KHTML, like Gecko; compatible; bingbot/2.0; \
         +http://www.bing.com/bingbot.htm) Chrome/116.0.1938.76 Safari/537.36",
        Bot,
    ),
    (
        "Yahoo Slurp",
        "Mozilla/5.0 (compatible; Yahoo! Slurp; http://help.yahoo.com/help/us/ysearch/slurp)",
        Bot,
    ),
    (
        "DuckDuckBot",
        "DuckDuckBot/1.1; (+http://duckduckgo.com/duckduckbot.html)",
        Bot,
    ),
    (
        "Baiduspider",
        "Mozilla/5.0 (compatible; Baiduspider/2.0; +http://www.baidu.com/search/spider.html)",
        Bot,
    ),
    (
        "YandexBot",
        "Mozilla/5.0 (compatible; YandexBot/3.0; +http://yandex.com/bots)",
        Bot,
    ),
    (
        "Applebot",
        "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like \
         Gecko) Version/17.4 Safari/605.1.15 (Applebot/0.1; +http://www.apple.com/go/applebot)",
        Bot,
    ),
    (
        "GPTBot",
        "Mozilla/5.0 AppleWebKit/537.36 (KHTML, like Gecko; compatible; GPTBot/1.2; \
         +https://openai.com/gptbot)",
        Bot,
    ),
    (
        "AhrefsBot",
        "Mozilla/5.0 (compatible; AhrefsBot/7.0; +http://ahrefs.com/robot/)",
        Bot,
    ),
    (
        "Facebook link preview",
        "facebookexternalhit/1.1 (+http://www.facebook.com/externalhit_uatext.php)",
        Bot,
    ),
    ("Twitterbot", "Twitterbot/1.0", Bot),
    (
        "Slack link preview",
        "Slackbot-LinkExpanding 1.0 (+https://api.slack.com/robots)",
        Bot,
    ),
    ("WhatsApp link preview", "WhatsApp/2.23.20.0", Bot),
    ("curl", "curl/8.5.0", Bot),
    ("Wget", "Wget/1.21.4", Bot),
    ("python-requests", "python-requests/2.32.3", Bot),
    ("Go's HTTP client", "Go-http-client/2.0", Bot),
    (
        "PowerShell",
        "Mozilla/5.0 (Windows NT 10.0; Microsoft Windows 10.0.19045; en-US) PowerShell/7.4.1",
        Bot,
    ),
    (
        "Headless Chrome",
        "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) \
         HeadlessChrome/131.0.0.0 Safari/537.36",
        Bot,
    ),
    (
        "Lighthouse",
        "Mozilla/5.0 (Linux; Android 11; moto g power (2022)) AppleWebKit/537.36 (KHTML, like \
         Gecko) Chrome/131.0.0.0 Mobile Safari/537.36 Chrome-Lighthouse",
        Bot,
    ),
];

/// `User-Agent` strings that name no class: the default class applies.
const UNKNOWN: &[(&str, &str)] = &[
    ("empty", ""),
    ("blank", "   "),
    ("bare Mozilla token", "Mozilla/5.0"),
    ("OkHttp in an Android app", "okhttp/4.12.0"),
    (
        "an iOS app's CFNetwork client, phone or tablet",
        "MyApp/1.0 CFNetwork/1494.0.7 Darwin/23.4.0",
    ),
];

#[test]
fn user_agent_table() {
    let mut wrong = Vec::new();
    for (client, user_agent, expected) in USER_AGENTS {
        let got = classify(Some(user_agent), None);
        if got != Some(*expected) {
            wrong.push(format!("{client}: got {got:?}, expected {expected:?}"));
        }
    }
    assert!(wrong.is_empty(), "misclassified:\n{}", wrong.join("\n"));
}

#[test]
fn table_covers_every_class() {
    assert!(USER_AGENTS.len() >= 50, "{} strings", USER_AGENTS.len());
    for class in [Mobile, Tablet, Desktop, Tv, Bot] {
        let count = USER_AGENTS.iter().filter(|(_, _, c)| *c == class).count();
        assert!(count >= 5, "{class:?} has only {count} strings");
    }
}

#[test]
fn unknown_user_agents() {
    for (client, user_agent) in UNKNOWN {
        assert_eq!(classify(Some(user_agent), None), None, "{client}");
    }
    assert_eq!(classify(None, None), None);
}

#[test]
fn mobile_hint_makes_mobile() {
    let linux_chrome = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) \
                        Chrome/131.0.0.0 Safari/537.36";
    assert_eq!(classify(Some(linux_chrome), Some("?1")), Some(Mobile));
    assert_eq!(classify(Some(linux_chrome), Some(" ?1 ")), Some(Mobile));
    assert_eq!(classify(Some(linux_chrome), Some("?0")), Some(Desktop));
    assert_eq!(classify(None, Some("?1")), Some(Mobile));
    assert_eq!(classify(None, Some("?0")), None);
}

#[test]
fn mobile_hint_ignored_for_bots() {
    assert_eq!(classify(Some("curl/8.5.0"), Some("?1")), Some(Bot));
}

#[test]
fn tablet_hint_zero_keeps_tablet() {
    // Chrome on an Android tablet sends `?0` with a string without Mobile.
    let tablet = "Mozilla/5.0 (Linux; Android 10; K) AppleWebKit/537.36 (KHTML, like Gecko) \
                  Chrome/131.0.0.0 Safari/537.36";
    assert_eq!(classify(Some(tablet), Some("?0")), Some(Tablet));
}

#[test]
fn class_names() {
    let names: Vec<_> = [Mobile, Tablet, Desktop, Tv, Bot]
        .iter()
        .map(|class| class.as_str())
        .collect();
    assert_eq!(names, ["mobile", "tablet", "desktop", "tv", "bot"]);
}
