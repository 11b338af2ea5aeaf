//! Cities and named places the assistant and the mini-programs know, in
//! English, Chinese and Korean, with coordinates and local time. Lookups accept any of the three names,
//! ignore case, spaces and punctuation, and also match a known alias
//! (`PVG`, `浦东机场`), so a place typed the way a person says it resolves.

use serde::Serialize;

#[derive(Debug, Clone, Copy, Serialize)]
pub struct Names {
    pub en: &'static str,
    pub zh: &'static str,
    pub ko: &'static str,
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct Place {
    pub id: &'static str,
    pub name: Names,
    #[serde(skip)]
    pub aliases: &'static [&'static str],
    pub lat: f64,
    pub lon: f64,
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct City {
    pub id: &'static str,
    pub name: Names,
    pub country: &'static str,
    pub currency: &'static str,
    pub lat: f64,
    pub lon: f64,
    #[serde(skip)]
    pub places: &'static [Place],
}

macro_rules! place {
    ($id:literal, $en:literal, $zh:literal, $ko:literal, [$($a:literal),*], $lat:literal, $lon:literal) => {
        Place { id: $id, name: Names { en: $en, zh: $zh, ko: $ko }, aliases: &[$($a),*], lat: $lat, lon: $lon }
    };
}

pub static CITIES: &[City] = &[
    City {
        id: "beijing",
        name: Names { en: "Beijing", zh: "北京", ko: "베이징" },
        country: "CN",
        currency: "CNY",
        lat: 39.9042,
        lon: 116.4074,
        places: &[
            place!("bj-tiananmen", "Tiananmen Square", "天安门广场", "톈안먼 광장", ["tiananmen", "天安门"], 39.9055, 116.3976),
            place!("bj-pek", "Beijing Capital International Airport", "北京首都国际机场", "베이징 서우두 국제공항", ["PEK", "capital airport", "首都机场", "北京机场"], 40.0799, 116.6031),
            place!("bj-south", "Beijing South Railway Station", "北京南站", "베이징남역", ["beijing south"], 39.8652, 116.3786),
            place!("bj-sanlitun", "Sanlitun", "三里屯", "싼리툰", [], 39.9334, 116.4551),
            place!("bj-wangfujing", "Wangfujing", "王府井", "왕푸징", [], 39.9142, 116.4107),
        ],
    },
    City {
        id: "shanghai",
        name: Names { en: "Shanghai", zh: "上海", ko: "상하이" },
        country: "CN",
        currency: "CNY",
        lat: 31.2304,
        lon: 121.4737,
        places: &[
            place!("sh-peoples-square", "People's Square", "人民广场", "인민광장", ["peoples square", "people square"], 31.2323, 121.4758),
            place!("sh-pvg", "Pudong International Airport", "浦东国际机场", "푸둥 국제공항", ["PVG", "pudong airport", "浦东机场", "上海浦东机场"], 31.1443, 121.8083),
            place!("sh-sha", "Hongqiao International Airport", "虹桥国际机场", "훙차오 국제공항", ["SHA", "hongqiao airport", "虹桥机场"], 31.1979, 121.3363),
            place!("sh-hongqiao-station", "Shanghai Hongqiao Railway Station", "上海虹桥站", "상하이 훙차오역", ["hongqiao station", "虹桥站", "虹桥火车站"], 31.1940, 121.3206),
            place!("sh-bund", "The Bund", "外滩", "와이탄", ["bund"], 31.2400, 121.4900),
            place!("sh-lujiazui", "Lujiazui", "陆家嘴", "루자쭈이", [], 31.2397, 121.4998),
            place!("sh-jingan", "Jing'an Temple", "静安寺", "징안사", ["jingan", "静安"], 31.2231, 121.4454),
        ],
    },
    City {
        id: "hangzhou",
        name: Names { en: "Hangzhou", zh: "杭州", ko: "항저우" },
        country: "CN",
        currency: "CNY",
        lat: 30.2741,
        lon: 120.1551,
        places: &[
            place!("hz-west-lake", "West Lake", "西湖", "시후", ["xihu"], 30.2460, 120.1500),
            place!("hz-east", "Hangzhou East Railway Station", "杭州东站", "항저우동역", ["hangzhou east"], 30.2906, 120.2127),
            place!("hz-hgh", "Hangzhou Xiaoshan International Airport", "杭州萧山国际机场", "항저우 샤오산 국제공항", ["HGH", "xiaoshan airport", "萧山机场"], 30.2295, 120.4344),
            place!("hz-wulin", "Wulin Square", "武林广场", "우린 광장", ["wulin"], 30.2747, 120.1637),
        ],
    },
    City {
        id: "shenzhen",
        name: Names { en: "Shenzhen", zh: "深圳", ko: "선전" },
        country: "CN",
        currency: "CNY",
        lat: 22.5431,
        lon: 114.0579,
        places: &[
            place!("sz-north", "Shenzhen North Railway Station", "深圳北站", "선전북역", ["shenzhen north"], 22.6096, 114.0290),
            place!("sz-szx", "Shenzhen Bao'an International Airport", "深圳宝安国际机场", "선전 바오안 국제공항", ["SZX", "baoan airport", "宝安机场"], 22.6393, 113.8107),
            place!("sz-futian", "Futian CBD", "福田中心区", "푸톈 중심구", ["futian", "福田"], 22.5410, 114.0540),
            place!("sz-window", "Window of the World", "世界之窗", "세계지창", [], 22.5360, 113.9730),
        ],
    },
    City {
        id: "guangzhou",
        name: Names { en: "Guangzhou", zh: "广州", ko: "광저우" },
        country: "CN",
        currency: "CNY",
        lat: 23.1291,
        lon: 113.2644,
        places: &[
            place!("gz-south", "Guangzhou South Railway Station", "广州南站", "광저우남역", ["guangzhou south"], 22.9886, 113.2690),
            place!("gz-can", "Guangzhou Baiyun International Airport", "广州白云国际机场", "광저우 바이윈 국제공항", ["CAN", "baiyun airport", "白云机场"], 23.3924, 113.2988),
            place!("gz-canton-tower", "Canton Tower", "广州塔", "광저우 타워", ["小蛮腰"], 23.1066, 113.3245),
            place!("gz-tianhe", "Tianhe", "天河", "톈허", [], 23.1350, 113.3270),
        ],
    },
    City {
        id: "seoul",
        name: Names { en: "Seoul", zh: "首尔", ko: "서울" },
        country: "KR",
        currency: "KRW",
        lat: 37.5665,
        lon: 126.9780,
        places: &[
            place!("se-station", "Seoul Station", "首尔站", "서울역", [], 37.5547, 126.9707),
            place!("se-icn", "Incheon International Airport", "仁川国际机场", "인천국제공항", ["ICN", "incheon airport", "인천공항", "仁川机场"], 37.4602, 126.4407),
            place!("se-gangnam", "Gangnam Station", "江南站", "강남역", ["gangnam", "강남"], 37.4979, 127.0276),
            place!("se-myeongdong", "Myeongdong", "明洞", "명동", [], 37.5636, 126.9826),
            place!("se-hongdae", "Hongik University", "弘大", "홍대입구", ["hongdae", "홍대"], 37.5572, 126.9245),
        ],
    },
    City {
        id: "busan",
        name: Names { en: "Busan", zh: "釜山", ko: "부산" },
        country: "KR",
        currency: "KRW",
        lat: 35.1796,
        lon: 129.0756,
        places: &[
            place!("bs-station", "Busan Station", "釜山站", "부산역", [], 35.1151, 129.0422),
            place!("bs-haeundae", "Haeundae Beach", "海云台海水浴场", "해운대 해수욕장", ["haeundae", "해운대", "海云台"], 35.1587, 129.1604),
            place!("bs-pus", "Gimhae International Airport", "金海国际机场", "김해국제공항", ["PUS", "gimhae airport", "김해공항"], 35.1795, 128.9382),
            place!("bs-seomyeon", "Seomyeon", "西面", "서면", [], 35.1578, 129.0600),
        ],
    },
];

/// Lower-cases and drops spaces and punctuation, so "People's Square",
/// "peoples square" and "PEOPLES-SQUARE" compare equal.
pub fn fold(s: &str) -> String {
    s.chars()
        .filter(|c| c.is_alphanumeric())
        .flat_map(|c| c.to_lowercase())
        .collect()
}

impl Names {
    pub fn all(&self) -> [&'static str; 3] {
        [self.en, self.zh, self.ko]
    }
    pub fn get(&self, lang: &str) -> &'static str {
        match lang {
            "zh" => self.zh,
            "ko" => self.ko,
            _ => self.en,
        }
    }
}

/// Every city the world knows, with its places.
pub fn all() -> &'static [City] {
    CITIES
}

pub fn city(query: &str) -> Option<&'static City> {
    let q = fold(query);
    if q.is_empty() {
        return None;
    }
    let q = q.strip_suffix("city").filter(|s| !s.is_empty()).unwrap_or(&q).to_string();
    let q = q.strip_suffix('市').filter(|s| !s.is_empty()).unwrap_or(&q).to_string();
    CITIES
        .iter()
        .find(|c| fold(c.id) == q || c.name.all().iter().any(|n| fold(n) == q))
}

pub fn city_by_id(id: &str) -> Option<&'static City> {
    CITIES.iter().find(|c| c.id == id)
}

/// A named place: exact name or alias in any language first, then a place
/// whose name contains the query (or the other way round), preferring
/// `near_city` when given.
pub fn place(query: &str, near_city: Option<&str>) -> Option<(&'static City, &'static Place)> {
    let q = fold(query);
    if q.len() < 2 {
        return None;
    }
    let all = || {
        CITIES.iter().flat_map(|c| c.places.iter().map(move |p| (c, p)))
    };
    let names = |p: &Place| {
        p.name.all().into_iter().chain(p.aliases.iter().copied()).map(fold).collect::<Vec<_>>()
    };
    let prefer = |hits: Vec<(&'static City, &'static Place)>| {
        let near = near_city.and_then(city).map(|c| c.id);
        hits.iter().find(|(c, _)| Some(c.id) == near).or(hits.first()).copied()
    };
    let exact: Vec<_> = all().filter(|(_, p)| names(p).contains(&q)).collect();
    if !exact.is_empty() {
        return prefer(exact);
    }
    let partial: Vec<_> = all()
        // A short Latin query is inside too many names ("me" in "Times Square").
        .filter(|(_, p)| names(p).iter().any(|n| n.len() >= 2 && ((n.contains(&q) && (q.len() >= 4 || !q.is_ascii())) || q.contains(n.as_str()))))
        .collect();
    prefer(partial)
}

/// Great-circle distance in kilometres.
pub fn distance_km(a: (f64, f64), b: (f64, f64)) -> f64 {
    let (la1, lo1, la2, lo2) = (a.0.to_radians(), a.1.to_radians(), b.0.to_radians(), b.1.to_radians());
    let h = ((la2 - la1) / 2.0).sin().powi(2) + la1.cos() * la2.cos() * ((lo2 - lo1) / 2.0).sin().powi(2);
    6371.0 * 2.0 * h.sqrt().asin()
}

/// Minutes after local midnight at `now_ms` in `city` (UTC+8 in China,
/// UTC+9 in Korea; neither has daylight saving time).
pub fn local_minute(now_ms: i64, city: &City) -> u32 {
    let offset = if city.country == "KR" { 9 * 60 } else { 8 * 60 };
    (now_ms.div_euclid(60_000) + offset).rem_euclid(1440) as u32
}

/// The city whose centre is nearest to a coordinate.
pub fn nearest_city(lat: f64, lon: f64) -> &'static City {
    CITIES
        .iter()
        .min_by(|a, b| {
            distance_km((lat, lon), (a.lat, a.lon)).total_cmp(&distance_km((lat, lon), (b.lat, b.lon)))
        })
        .expect("CITIES is not empty")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cities_and_places_resolve_in_three_languages() {
        for q in ["Shanghai", "上海", "상하이", "shanghai city", "上海市"] {
            assert_eq!(city(q).unwrap().id, "shanghai", "{q}");
        }
        for q in ["People's Square", "peoples square", "人民广场", "인민광장"] {
            assert_eq!(place(q, None).unwrap().1.id, "sh-peoples-square", "{q}");
        }
        assert_eq!(place("PVG", None).unwrap().1.id, "sh-pvg");
        assert_eq!(place("pudong airport", None).unwrap().1.id, "sh-pvg");
        assert_eq!(place("인천공항", None).unwrap().1.id, "se-icn");
        assert!(place("Atlantis", None).is_none());
        assert!(city("Atlantis").is_none());
        for id in ["beijing", "shanghai", "hangzhou", "shenzhen", "guangzhou", "seoul", "busan"] {
            assert!(city_by_id(id).is_some());
        }
        let d = distance_km((31.2323, 121.4758), (31.1443, 121.8083));
        assert!((30.0..40.0).contains(&d), "{d}");
        assert_eq!(nearest_city(37.5, 127.0).id, "seoul");
    }
}
