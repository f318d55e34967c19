"""Labels in Japanese (first) and English, decision reasons in words, dates as people write them.

A table: key -> (ja, en). A key missing from the table shows as itself (a bug to see, not a crash).
"""

from __future__ import annotations

from datetime import date

LANGS = ("ja", "en")

L: dict[str, tuple[str, str]] = {
    "title": ("CCUS タッチ管理コンソール", "CCUS touch console"),
    "login": ("ログイン", "Log in"), "logout": ("ログアウト", "Log out"),
    "user": ("ユーザー名", "User name"), "password": ("パスワード", "Password"),
    "bad_login": ("ユーザー名またはパスワードが違います", "Wrong user name or password"),
    "locked": ("ログイン失敗が続いたため一時的にロックされています。{s}秒後に再試行してください",
               "Too many failed logins: try again in {s} s"),
    "fleet": ("端末一覧", "Fleet"), "sites": ("現場", "Sites"), "live": ("ライブ", "Live"),
    "onsite": ("入場中", "On site now"), "work_history": ("就業履歴", "Work history"),
    "days_worked": ("就労日数（建退共）", "Days worked (建退共)"),
    "training": ("講習", "Training"), "training_courses": ("講習コース", "Training courses"),
    "vending": ("自販機請求", "Vending billing"), "ops": ("運用", "Operations"),
    "site": ("現場ID", "Site"), "device": ("端末", "Device"), "role": ("種別", "Role"),
    "status": ("状態", "Status"), "online": ("オンライン", "online"),
    "offline": ("オフライン", "offline"), "last_seen": ("最終受信", "Last seen"),
    "sw": ("ソフト", "Software"), "cv": ("設定", "Config"), "lv": ("リスト", "List"),
    "backlog": ("未送信", "Backlog"), "oldest": ("最古", "Oldest"),
    "readers": ("リーダー", "Readers"), "board": ("制御基板", "Board"),
    "clock": ("時刻品質", "Clock"), "disk": ("ディスク", "Disk"),
    "problems": ("問題", "Problems"), "ok": ("正常", "ok"),
    "time": ("時刻", "Time"), "direction": ("方向", "Direction"),
    "technician": ("技能者ID", "Technician"), "decision": ("判定", "Decision"),
    "reason": ("理由", "Reason"), "allow": ("許可", "allowed"), "deny": ("拒否", "denied"),
    "in": ("入場", "in"), "out": ("退場", "out"),
    "entry": ("入場", "Entry"), "exit": ("退場", "Exit"),
    "missing": ("打刻なし", "missing"), "count": ("人数", "Count"),
    "month": ("年月", "Month"), "day": ("日付", "Day"), "days": ("日数", "Days"),
    "center": ("講習センター", "Center"), "persons": ("人数", "Persons"),
    "touches": ("タッチ数", "Touches"), "course": ("コース", "Course"), "name": ("名称", "Name"),
    "starts": ("開始", "Starts"), "ends": ("終了", "Ends"), "enrolled": ("受講者", "Enrolled"),
    "card_ownership_rate_pct": ("カード保有率(%)", "Card ownership %"),
    "contractor": ("元請（事業者ID）", "Main contractor"), "machines": ("台数", "Machines"),
    "dispensed": ("提供（請求）", "Dispensed (billed)"), "failed": ("失敗", "Failed"),
    "indeterminate": ("不明", "Indeterminate"), "taps": ("タッチ", "Taps"),
    "hours": ("時間", "Hours"), "work_day": ("就業日", "Work day"),
    "entry_missing": ("入場なし", "Entry missing"), "exit_missing": ("退場なし", "Exit missing"),
    "csv": ("CSVダウンロード", "Download CSV"), "show": ("表示", "Show"),
    "print": ("印刷", "Print"), "filter": ("絞り込み", "Filter"),
    "dead_letters": ("受信エラー", "Dead letters"), "gaps": ("連番の欠け", "Sequence gaps"),
    "flagged": ("時刻異常のタッチ", "Flagged touches"), "id_list": ("IDリスト", "ID list"),
    "version": ("版", "Version"), "records": ("件数", "Records"), "age": ("発行日時", "Issued"),
    "forbidden": ("この画面を表示する権限がありません", "You may not see this page"),
    "no_rows": ("データなし", "No data"), "waiting": ("タッチ待ち…", "Waiting for touches…"),
    "config_pushes": ("設定の配信と応答", "Config pushes and acks"),
    "scope": ("対象", "Scope"), "scope_device": ("端末", "device"), "scope_site": ("現場全体", "site"),
    "issued": ("配信日時", "Issued"), "acked": ("応答の版", "Acked version"),
    "result": ("結果", "Result"), "ack_time": ("応答日時", "Acked at"),
    "push_applied": ("適用済み", "applied"), "push_refused": ("拒否", "refused"),
    "push_waiting": ("応答待ち", "waiting"),
    "dropped": ("表示が追いつかず {n} 件を省略しました（記録は残っています）",
                "{n} touches not shown: this page fell behind (they are stored)"),
    "onsite_now": ("現在入場中", "On site now"), "people": ("名", " people"),
    "denials_only": ("拒否のみ", "Denials only"), "detail": ("詳細", "Detail"),
    "seq": ("連番", "Seq"), "from": ("から", "from"), "to": ("まで", "to"),
    "persons_unique": ("実人数（期間内の重複なし）", "Persons, each once"),
    "cut_hour": ("日付の区切り（時）", "Day cut (hour)"),
    "machine": ("自販機", "Machine"), "employer": ("所属事業者", "Employer"),
    "per_machine": ("自販機別", "Per machine"), "person_name": ("氏名", "Name"),
}

# a gate's passage (edge/roles/gate.py): pending on the tap, then a follow-up with the outcome
PASSAGE: dict[str, tuple[str, str]] = {
    "pending": ("通過待ち", "passage pending"),
    "passed": ("通過", "passed"),
    "not_passed": ("通過せず", "did not pass"),
    "unconfirmed": ("通過未確認", "passage unconfirmed"),
    "not_actuated": ("開扉せず", "gate not opened"),
}

# decision reasons in words (protocol/reasons.py codes)
REASONS: dict[str, tuple[str, str]] = {
    "ok": ("OK", "ok"),
    "unknown_card": ("未登録のカード", "card not on the list"),
    "unknown_technician": ("未登録の技能者", "technician not on the list"),
    "suspended": ("利用停止中", "suspended"),
    "revoked": ("失効", "revoked"),
    "unreadable": ("カードを読み取れません", "card unreadable"),
    "bad_card_data": ("カードのデータが不正", "bad card data"),
    "foreign_card": ("CCUSカードではありません", "not a CCUS card"),
    "no_list": ("IDリスト未配信", "no ID list on the device"),
    "limit_reached": ("本日の上限に達しました", "allowance used up"),
    "anti_passback": ("同じ方向の二重タッチ", "same direction twice"),
    "not_actuated": ("許可（制御基板オフラインのため開扉せず）", "allowed, board offline: not opened"),
    "emergency_open": ("許可（非常開放中）", "allowed while the emergency release holds the gate open"),
    "registered": ("登録済み", "registered"),
    "unregistered": ("未登録（記録のみ）", "unregistered (counted)"),
    "truncated_read": ("読み取りが途中で切れました", "truncated read"),
    "wrong_service": ("カードのサービスが違います", "wrong card service"),
    "wrong_technology": ("カードの方式が違います", "wrong card technology"),
    "foreign_application": ("別用途のカード", "foreign application"),
    "file_not_found": ("カード内のファイルなし", "file not found on card"),
    "access_denied": ("カードへのアクセス拒否", "card access denied"),
    "bad_response": ("カードの応答が不正", "bad card response"),
}


def t(key: str, lang: str) -> str:
    pair = L.get(key)
    return key if pair is None else pair[1 if lang == "en" else 0]


def reason(code: str, lang: str) -> str:
    pair = REASONS.get(code)
    return code if pair is None else pair[1 if lang == "en" else 0]


def passage(code: str, lang: str) -> str:
    pair = PASSAGE.get(code)
    return code if pair is None else pair[1 if lang == "en" else 0]


def fmt_date(iso: str, lang: str) -> str:
    """'2026-11-26' -> '2026年11月26日' (ja) or '2026-11-26' (en); other text unchanged."""
    try:
        d = date.fromisoformat(iso)
    except (TypeError, ValueError):
        return iso
    return f"{d.year}年{d.month}月{d.day}日" if lang != "en" else d.isoformat()


def fmt_month(month: str, lang: str) -> str:
    """'2026-11' -> '2026年11月' (ja)."""
    y, _, m = month.partition("-")
    if lang == "en" or not (y.isdigit() and m.isdigit()):
        return month
    return f"{int(y)}年{int(m)}月"


def fmt_day_short(iso: str, lang: str) -> str:
    """A grid column head: '26日' / '26'."""
    try:
        d = date.fromisoformat(iso)
    except (TypeError, ValueError):
        return iso
    return f"{d.day}日" if lang != "en" else str(d.day)
